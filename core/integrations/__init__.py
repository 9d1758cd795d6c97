"""Integrations with the libraries users already run models with (transformers first). The core never
imports this package; it imports the core."""
