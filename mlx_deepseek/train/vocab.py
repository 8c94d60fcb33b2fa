"""The nano-r1 tokenizer: a sentencepiece Unigram model trained on the synthetic task corpus.

Digits are split (one id per digit), DeepSeek's chat tokens and the newline are user-defined symbols
(one id each, never split or merged), unseen characters fall back to bytes, and text is not normalized
(so `decode(encode(x)) == x`). The folder holds `tokenizer.model` (sentencepiece), `tokenizer.json` (the
same model for the `tokenizers` library: what `mlx_deepseek.load` and `mlx_lm.load` read) and
`tokenizer_config.json` (special tokens and the R1 chat template).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Iterable, Optional

from ..chat import ASSISTANT, BOS, END_THINK, EOS, THINK, USER
from ..tokenizer import read_sentencepiece, sentencepiece_to_tokenizers
from ..weights import atomic_folder
from . import tasks

USER_SYMBOLS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK, "\n")
SPECIAL = (BOS, EOS)  # skipped by decode(skip_special_tokens=True), as in DeepSeek-R1's tokenizer

# The R1 template as chat.render(..., "r1") writes it: earlier answers lose their reasoning, and the
# generation prompt opens the <think> block.
R1_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '" + USER + "' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}"
    "{% if '</think>' in c %}{% set c = c.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "{{ '" + ASSISTANT + "' + c + '" + EOS + "' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + THINK + "\\n' }}{% endif %}"
)


def corpus(n: int = 20000, seed: int = 0) -> list[str]:
    """Training text for the tokenizer: train-split chat texts plus some at the hard levels (longer numbers),
    from the train side (no evaluated problem)."""
    return list(tasks.chat_texts(n, "train", seed)) + list(tasks.chat_texts(max(1, n // 20), "train", seed, beyond=True))


def train_tokenizer(
    out: str | Path,
    vocab_size: int = 768,
    n_texts: int = 20000,
    seed: int = 0,
    texts: Optional[Iterable[str]] = None,
    overwrite: bool = False,
) -> Path:
    """Train the sentencepiece model and write the tokenizer folder `out` (atomically)."""
    import sentencepiece as spm

    out = Path(out)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    texts = list(texts) if texts is not None else corpus(n_texts, seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        split_digits=True, byte_fallback=True, user_defined_symbols=list(USER_SYMBOLS),
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, max_sentence_length=1 << 20,
        num_threads=1, minloglevel=2,
    )
    with atomic_folder(out) as tmp:
        write_tokenizer_files(tmp, model.getvalue())
    return out


def write_tokenizer_files(folder: Path, model_bytes: bytes) -> None:
    """tokenizer.model, tokenizer.json and tokenizer_config.json for a sentencepiece model."""
    folder = Path(folder)
    (folder / "tokenizer.model").write_bytes(model_bytes)
    tok = sentencepiece_to_tokenizers(read_sentencepiece(folder / "tokenizer.model"), SPECIAL)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False))


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": R1_CHAT_TEMPLATE,
    }


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Put a tokenizer folder's files beside a model (checkpoints carry their tokenizer)."""
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)
