"""mlx-deepseek: the DeepSeek model family (V1, DeepSeekMoE, V2, V3, R1, R1 distills) in MLX."""

from .config import ConfigError, ModelArgs
from .loading import load, load_model
from .weights import CheckpointError

__version__ = "0.1.0"
__all__ = ["load", "load_model", "ModelArgs", "ConfigError", "CheckpointError", "__version__"]
