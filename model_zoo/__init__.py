"""moetier.model_zoo: one module per model family, each a plugin of the moetier entry-point group."""
