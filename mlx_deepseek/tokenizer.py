"""Tokenizers: a Hugging Face tokenizer.json (through mlx-lm's streaming wrapper) or a sentencepiece model."""

from __future__ import annotations

from pathlib import Path


class TokenizerError(ValueError):
    pass


def load_tokenizer(folder: Path):
    """The folder's tokenizer as an mlx-lm TokenizerWrapper (encode, decode, streaming detokenizer)."""
    from mlx_lm.tokenizer_utils import load as load_hf_tokenizer

    folder = Path(folder)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise TokenizerError(
            f"{folder}: no tokenizer (tokenizer.json, tokenizer_config.json or tokenizer.model); "
            "copy the tokenizer files of the original model into this folder, or use load_model() for weights only"
        )
    return load_hf_tokenizer(folder)
