"""The model core: building blocks composed into one decoder driven by ModelArgs."""

from .decoder import DecoderLayer, DeepSeekModel, Model

__all__ = ["DecoderLayer", "DeepSeekModel", "Model"]
