import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
FAMILY_FIXTURES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.npz").exists())


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref| over all logits."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def write_tokenizer(folder: Path, vocab_size: int = 128) -> None:
    """A tiny word-level tokenizer.json (made with the `tokenizers` library) and its config: 'w5' is id 5."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    ))


def offline_hub(root: Path, repo_id: str, fixture: str) -> dict:
    """A Hugging Face cache under `root` holding `fixture` as `repo_id`; returns the environment of a
    process that must find it offline (HF_HUB_OFFLINE=1, HF_HUB_CACHE=root)."""
    import os

    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "a" * 40
    shutil.copytree(FIXTURES / fixture, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root)}


@pytest.fixture
def fixture_copy(tmp_path):
    """A writable copy of a golden fixture folder."""

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(FIXTURES / name, dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A sentencepiece tokenizer trained on the synthetic tasks (vocab 512), shared by the tests."""
    from mlx_deepseek.train.vocab import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=512, n_texts=2000)


@pytest.fixture(scope="session")
def tok(tok_dir):
    from mlx_deepseek.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)
