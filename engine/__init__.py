"""sdrt's runtime: models, checkpoint loading, tokenizer, samplers, pipeline and CLI."""
from .errors import SdrtError
from .pipeline import Pipeline

__all__ = ["Pipeline", "SdrtError"]
