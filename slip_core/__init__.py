"""slip_core: the pure SLIP library (no Prefect): tokenizer, models, losses, data, trainer, eval, artifacts."""
__version__ = "0.1.0"
