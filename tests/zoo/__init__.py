"""Helpers and fixtures for the model-zoo golden tests (transformers is the reference)."""
