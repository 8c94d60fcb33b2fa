"""Tokenizers: a Hugging Face tokenizer.json (through mlx-lm's streaming wrapper) or a sentencepiece model.

A folder with `tokenizer.json` (or a `tokenizer_config.json` that transformers can resolve) loads through
mlx-lm's loader. A folder with only a sentencepiece `tokenizer.model` (Unigram, as `mlx-deepseek train
tokenizer` makes them) is converted in memory by `sentencepiece_to_tokenizers`, so both paths give the same
object: an mlx-lm `TokenizerWrapper` (encode, decode, eos_token_id(s), streaming `detokenizer`).
"""

from __future__ import annotations

import json
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
    if not (folder / "tokenizer.json").exists() and (folder / "tokenizer.model").exists() and _is_ours(folder):
        return load_sentencepiece(folder)
    return load_hf_tokenizer(folder)


def _is_ours(folder: Path) -> bool:
    """A sentencepiece folder without a transformers tokenizer class (ours): convert it here."""
    config = folder / "tokenizer_config.json"
    if not config.exists():
        return True
    cls = json.loads(config.read_text()).get("tokenizer_class")
    return cls in (None, "PreTrainedTokenizerFast")


# ---- sentencepiece ------------------------------------------------------------------------------
def read_sentencepiece(path: Path):
    """The ModelProto of a sentencepiece model file."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as e:
        raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from None
    return proto


def sentencepiece_to_tokenizers(proto, special: tuple[str, ...] = ()):
    """A `tokenizers.Tokenizer` that encodes exactly as the sentencepiece Unigram model `proto` does.

    Pieces keep their ids. User-defined symbols become added tokens (one id each, matched before
    normalization), `special` ones among them marked special (skipped by skip_special_tokens). Spaces are
    the "▁" of sentencepiece; the decoder turns only a piece's leading "▁" back into a space, so added
    tokens that contain "▁" (DeepSeek's `<｜begin▁of▁sentence｜>`) decode verbatim.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if proto.trainer_spec.model_type != 1:  # 1 = UNIGRAM
        raise TokenizerError(
            "only sentencepiece Unigram models convert here; for BPE models add a tokenizer_config.json naming "
            "the transformers tokenizer class (e.g. LlamaTokenizer) so transformers converts it"
        )
    ns = proto.normalizer_spec
    if ns.name not in ("identity", "") and ns.precompiled_charsmap == b"":
        raise TokenizerError(f"sentencepiece normalizer {ns.name!r} has no precompiled charsmap to convert")
    tok = Tokenizer(
        models.Unigram(
            [(p.piece, p.score) for p in proto.pieces], unk_id=proto.trainer_spec.unk_id,
            byte_fallback=proto.trainer_spec.byte_fallback,
        )
    )
    norms = []
    if ns.name not in ("identity", ""):
        norms.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norms += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    norms.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norms)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if ns.add_dummy_prefix else "never",
        split=proto.trainer_spec.split_by_whitespace,
    )
    steps = [decoders.Replace(Regex("^▁"), " "), decoders.ByteFallback(), decoders.Fuse()]
    if ns.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_tokens([
        AddedToken(p.piece, normalized=False, special=p.piece in special)
        for p in proto.pieces if p.type == 4  # USER_DEFINED
    ])
    return tok


def load_sentencepiece(folder: Path):
    """A folder's sentencepiece `tokenizer.model` (+ optional tokenizer_config.json) as a TokenizerWrapper."""
    from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer, TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    special = tuple(config.get(k) for k in ("bos_token", "eos_token", "pad_token") if isinstance(config.get(k), str))
    special += tuple(config.get("additional_special_tokens", ()))
    tok = sentencepiece_to_tokenizers(read_sentencepiece(folder / "tokenizer.model"), special)
    kwargs = {k: v for k, v in config.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template")}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)
    return TokenizerWrapper(hf, NaiveStreamingDetokenizer)
