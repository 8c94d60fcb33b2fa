"""convert: the streaming convert-and-quantize tool (Hugging Face / FP8 -> MLX, MLX -> Hugging Face).

    from convert import convert
    convert("deepseek-ai/DeepSeek-V2-Lite", "v2-lite-4bit", q_bits=4, recipe="mixed")
"""

from .pipeline import Report, convert, parse_size
from .recipes import RECIPES
from .writer import ConvertError

__all__ = ["convert", "Report", "RECIPES", "ConvertError", "parse_size"]
