"""Cloud tier: coordinator, server optimizers, model store, evaluation."""
