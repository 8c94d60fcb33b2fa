"""The nano-r1 sentencepiece tokenizer: special tokens, round trips, split digits, loading paths."""

import shutil

import mlx.core as mx
import pytest
import sentencepiece as spm

from mlx_deepseek import load
from mlx_deepseek.chat import ASSISTANT, BOS, END_THINK, EOS, THINK, USER, render
from mlx_deepseek.config import ModelArgs
from mlx_deepseek.models import Model
from mlx_deepseek.tokenizer import load_tokenizer
from mlx_deepseek.train import tasks
from mlx_deepseek.weights import save_model

SPECIALS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK)
TEXTS = [
    "What is 4738 + 925? The answer is \\boxed{5663}.",
    "计算 4738 + 925。答案是 \\boxed{5663}。",
    "  two  spaces, a tab\tand unseen 😀 ∑ Ω at the end ",
    "\n\nnewlines\n",
]



def test_files_and_config(tok_dir, tok):
    assert {p.name for p in tok_dir.iterdir()} == {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"}
    assert tok.vocab_size == 512
    assert tok.eos_token == EOS and tok.bos_token == BOS
    assert tok.eos_token_ids == {tok.convert_tokens_to_ids(EOS)}


def test_each_special_token_is_one_id(tok):
    ids = [tok.encode(s, add_special_tokens=False) for s in SPECIALS]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(SPECIALS)
    text = "".join(SPECIALS) + "x" + THINK
    assert tok.encode(text, add_special_tokens=False) == [i[0] for i in ids] + tok.encode("x") + ids[4]
    assert tok.decode([i[0] for i in ids]) == "".join(SPECIALS)  # "▁" inside BOS/EOS stays "▁"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_round_trip_of_chat_texts_and_no_bos_added(tok):
    for text in list(tasks.chat_texts(50, seed=7)) + list(tasks.chat_texts(20, "hard", seed=7)):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # only the text's own BOS


def test_digits_are_split(tok):
    ids = tok.encode("1234567890", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == list("1234567890")
    vocab = tok.get_vocab()
    assert not [p for p in vocab if len(p) > 1 and any(c.isdigit() for c in p) and not p.startswith("<0x")]


def test_streaming_detokenizer(tok):
    text = next(tasks.chat_texts(1, seed=2, langs=("zh",))) + " 😀"
    d = tok.detokenizer
    d.reset()
    for i in tok.encode(text):
        d.add_token(i)
    d.finalize()
    assert d.text == text


def test_chat_template_matches_the_built_in_r1_template(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": f"{THINK}\n2 + 2 = 4\n{END_THINK}\n\nThe answer is \\boxed{{4}}."},
        {"role": "user", "content": "计算 3 + 5。"},
    ]
    ours = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours == render(msgs, "r1")
    assert ours.endswith(ASSISTANT + THINK + "\n")


def test_sentencepiece_only_folder_loads_the_same(tok_dir, tok, tmp_path):
    """Without tokenizer.json, tokenizer.model is converted in memory: same ids (Unigram ties aside, which
    sentencepiece and `tokenizers` may break differently) and the same decoding."""
    folder = tmp_path / "sp"
    folder.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, folder / name)
    sp_only = load_tokenizer(folder)
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    texts = list(tasks.chat_texts(200, seed=11)) + TEXTS
    same = 0
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert sp_only.encode(text, add_special_tokens=False) == ids
        assert sp_only.decode(ids) == text
        same += sp.encode(text) == ids
    assert same >= 0.97 * len(texts)


def test_loads_with_the_model_through_mlx_deepseek_load(tok_dir, tmp_path):
    config = {
        "model_type": "deepseek_v3", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
        "moe_intermediate_size": 16, "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 2,
        "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
        "num_nextn_predict_layers": 1,
    }
    model = Model(ModelArgs.from_dict(config))
    save_model(model, tmp_path, config)
    for f in tok_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    model, tok = load(tmp_path)
    ids = tok.encode(next(tasks.chat_texts(1)))
    assert model(mx.array([ids])).shape == (1, len(ids), 512)
