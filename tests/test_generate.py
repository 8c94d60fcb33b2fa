"""Generation: determinism, MTP speculation, batching, traces, prompt-cache reuse, stops, quantized KV cache."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, relative_error, write_tokenizer

import mlx_deepseek
from mlx_deepseek.config import ModelArgs
from mlx_deepseek.generate import PromptCache, Sampling, batch_generate, generate, generate_tokens, make_cache
from mlx_deepseek.models import Model

PROMPT = [1, 5, 6, 7, 8]


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """The DeepSeek-V3 golden fixture (MLA, MoE, MTP) with a word-level tokenizer: 'w5' is token 5."""
    import shutil

    from conftest import FIXTURES

    folder = tmp_path_factory.mktemp("v3") / "model"
    shutil.copytree(FIXTURES / "deepseek_v3", folder)
    write_tokenizer(folder)
    return mlx_deepseek.load(folder, dtype="float32")


def test_greedy_is_deterministic_and_seeded_sampling_repeats(v3):
    model, tok = v3
    a, b = generate(model, tok, PROMPT, max_tokens=12), generate(model, tok, PROMPT, max_tokens=12)
    assert a.tokens == b.tokens and len(a.tokens) == 12 and a.finish_reason == "length"
    # greedy decoding is the argmax of the full forward pass, token after token
    seq = PROMPT + a.tokens
    full = model(mx.array(seq)[None])[0]
    assert mx.argmax(full[len(PROMPT) - 1 : -1], axis=-1).tolist() == a.tokens
    hot = Sampling(temperature=1.0, top_p=0.9, top_k=50, seed=3)
    s1, s2 = generate(model, tok, PROMPT, max_tokens=12, sampling=hot), generate(model, tok, PROMPT, max_tokens=12, sampling=hot)
    assert s1.tokens == s2.tokens and s1.tokens != a.tokens


@pytest.mark.parametrize("mtp", [False, True])
@pytest.mark.parametrize("hot", [Sampling(temperature=3.0, seed=11), Sampling(temperature=2.0, top_p=0.9, top_k=40, min_p=0.01, seed=4)])
def test_compiled_steps_sample_like_uncompiled_ones(v3, mtp, hot):
    """Sampling runs inside the compiled decode step with the random state as its input and output: the same
    seed draws the same tokens as the uncompiled step (a traced run), so the state advances every step."""
    model, tok = v3
    compiled = generate(model, tok, PROMPT, max_tokens=24, sampling=hot, mtp=mtp)
    uncompiled = generate(model, tok, PROMPT, max_tokens=24, sampling=hot, mtp=mtp, trace=True)
    assert compiled.tokens == uncompiled.tokens and len(set(compiled.tokens)) > 8


def test_repetition_penalty_reads_the_whole_history(v3):
    """Greedy with mlx-lm's repetition penalty = the argmax of the penalised full forward pass, token after
    token, with the prompt and every generated token as history (plain and MTP decoding)."""
    from mlx_lm.sample_utils import make_logits_processors

    model, tok = v3
    penalty = make_logits_processors(repetition_penalty=3.0)[0]
    seq = list(PROMPT)
    for _ in range(12):
        logits = model(mx.array(seq)[None])[:, -1, :]
        seq.append(mx.argmax(penalty(mx.array(seq)[None], logits), axis=-1).item())
    expected = seq[len(PROMPT):]
    assert expected != generate(model, tok, PROMPT, max_tokens=12).tokens  # the penalty changes the output
    for mtp in (False, True):
        out = generate(model, tok, PROMPT, max_tokens=12, mtp=mtp, sampling=Sampling(repetition_penalty=3.0))
        assert out.tokens == expected, mtp


def test_mtp_speculation_equals_plain_greedy_when_drafts_fail(v3):
    model, tok = v3
    plain = generate(model, tok, PROMPT, max_tokens=16)
    spec = generate(model, tok, PROMPT, max_tokens=16, mtp=True)
    assert spec.tokens == plain.tokens
    assert spec.mtp_drafted > 0 and spec.mtp_acceptance is not None


def test_mtp_speculation_equals_plain_greedy_when_drafts_succeed(v3, monkeypatch):
    """An oracle MTP head that drafts the true token at every third position: both branches run."""
    model, tok = v3
    plain = generate(model, tok, PROMPT, max_tokens=20)
    sequence = PROMPT + plain.tokens
    real = type(model).mtp_step

    def oracle(self, hidden, ahead, k=0, cache=None, at=None):
        h, logits = real(self, hidden, ahead, k, cache)  # every position's logits, then the one asked for
        start = int(cache.offset) - logits.shape[1]  # the calls's first pair (h_p, t_{p+1}) drafts t_{p+2}
        for i in range(logits.shape[1]):
            p = start + i
            if p + 2 < len(sequence) and p % 3 == 0:
                row = mx.full(logits.shape[-1:], -1e9).at[sequence[p + 2]].add(1e9 + 1)
                logits[:, i] = row
        return h, logits if at is None else logits[:, at]

    monkeypatch.setattr(type(model), "mtp_step", oracle)
    spec = generate(model, tok, PROMPT, max_tokens=20, mtp=True, trace=True)
    assert spec.tokens == plain.tokens
    assert 0.3 < spec.mtp_acceptance < 1.0
    assert len(spec.expert_trace.experts) == len(spec.tokens)
    reference = generate(model, tok, PROMPT, max_tokens=20, trace=True).expert_trace
    for a, b in zip(spec.expert_trace.experts, reference.experts):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def two_mtp_modules(v3):
    """The V3 fixture's shape with D = 2 MTP modules (random weights)."""
    model, tok = v3
    mx.random.seed(5)
    return Model(ModelArgs.from_dict({**json.loads((FIXTURES / "deepseek_v3" / "config.json").read_text()),
                                      "num_nextn_predict_layers": 2})), tok


def test_two_mtp_modules_draft_two_tokens_and_equal_plain_greedy(two_mtp_modules, monkeypatch):
    model, tok = two_mtp_modules
    plain = generate(model, tok, PROMPT, max_tokens=24)
    spec = generate(model, tok, PROMPT, max_tokens=24, mtp=True)  # the compiled, pipelined step
    assert spec.tokens == plain.tokens and spec.mtp_drafted % 2 == 0 and spec.mtp_drafted >= 24
    # an oracle: module k drafts the true token at some positions, so steps keep 0, 1 or 2 drafts
    sequence = PROMPT + plain.tokens
    real = type(model).mtp_step

    def oracle(self, hidden, ahead, k=0, cache=None, at=None):
        h, logits = real(self, hidden, ahead, k, cache)  # every position's logits, then the one asked for
        start = int(cache.offset) - logits.shape[1]  # pair (h^{k-1}_p, t_{p+k+1}) drafts t_{p+k+2}
        for i in range(logits.shape[1]):
            p = start + i
            if p + k + 2 < len(sequence) and p % (4 - k) != 3 - 2 * k:
                logits[:, i] = mx.full(logits.shape[-1:], -1e9).at[sequence[p + k + 2]].add(1e9 + 1)
        return h, logits if at is None else logits[:, at]

    monkeypatch.setattr(type(model), "mtp_step", oracle)
    pc = PromptCache(model)
    pc.traced = True  # uncompiled: the oracle reads the cache offset
    stats = {}
    steps = list(generate_tokens(model, PROMPT, max_tokens=24, mtp=True, stats=stats, prompt_cache=pc))
    assert sum(steps, []) == plain.tokens
    assert {len(s) for s in steps[1:-1]} == {1, 2, 3} and 0.3 < stats["accepted"] / stats["drafted"] < 1


def test_mtp_logits_at_one_position(v3):
    """Drafting asks an MTP module for one position's logits (an int or a 0-d array, as inside the compiled
    step): they equal that row of all positions' logits."""
    model, _ = v3
    hidden = model.model(mx.array([PROMPT]))
    ahead = mx.array([PROMPT[1:] + [9]])
    _, every = model.mtp_step(hidden, ahead)
    for at in (-1, 2, mx.array(3)):
        _, one = model.mtp_step(hidden, ahead, at=at)
        assert one.shape == (1, every.shape[-1])
        np.testing.assert_allclose(np.array(one), np.array(every[:, at]), rtol=1e-5, atol=1e-5)


def test_drafting_with_fewer_mtp_modules(two_mtp_modules):
    """mtp=D drafts with the model's first D modules; the same prompt cache switches depth between calls."""
    model, tok = two_mtp_modules
    plain = generate(model, tok, PROMPT, max_tokens=16)
    pc = PromptCache(model)
    one = generate(model, tok, PROMPT, max_tokens=16, mtp=1, prompt_cache=pc)
    assert one.tokens == plain.tokens and len(pc.mtp_cache) == 1
    both = generate(model, tok, PROMPT, max_tokens=16, mtp=True, prompt_cache=pc)
    assert both.tokens == plain.tokens and len(pc.mtp_cache) == 2 and both.mtp_drafted % 2 == 0
    with pytest.raises(ValueError, match="mtp=3: the model has 2 MTP module"):
        generate(model, tok, PROMPT, max_tokens=4, mtp=3)


def test_batched_equals_one_by_one(v3):
    model, tok = v3
    prompts = [PROMPT, [1, 9], [1, 3, 4, 5, 6, 7, 8, 9, 10]]
    single = [generate(model, tok, p, max_tokens=10).tokens for p in prompts]
    batched = batch_generate(model, tok, prompts, n=3, max_tokens=10)
    assert len(batched) == 9
    for i, expected in enumerate(single):
        for j in range(3):
            assert batched[3 * i + j].tokens == expected


class _EndsAt:
    """The tokenizer with another end-of-sequence token."""

    def __init__(self, tok, eos: int):
        self._tok, self.eos_token_id, self.eos_token_ids = tok, eos, [eos]

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_rows_that_finish_early_leave_the_batch_and_the_rest_decode_unchanged(v3):
    model, tok = v3
    prompts = [PROMPT, [1, 9], [1, 3, 4, 5, 6, 7, 8, 9, 10]]
    free = [generate(model, tok, p, max_tokens=10).tokens for p in prompts]
    at = next(i for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i])
    ends = _EndsAt(tok, free[0][at])  # a token of the first prompt's answer now ends a sequence
    single = [generate(model, ends, p, max_tokens=10) for p in prompts]
    assert len(single[0].tokens) == at and single[0].finish_reason == "stop"
    assert len({len(r.tokens) for r in single}) > 1  # rows finish at different steps
    batched = batch_generate(model, ends, prompts, n=2, max_tokens=10)
    for i, expected in enumerate(single):
        for j in range(2):
            assert batched[2 * i + j].tokens == expected.tokens
            assert batched[2 * i + j].finish_reason == expected.finish_reason


def test_group_samples_share_the_prompt_but_differ(v3):
    model, tok = v3
    out = batch_generate(model, tok, [PROMPT], n=4, max_tokens=8, sampling=Sampling(temperature=1.0, seed=0))
    assert len({tuple(r.tokens) for r in out}) > 1


def test_expert_trace_is_consistent(v3):
    model, tok = v3
    r = generate(model, tok, PROMPT, max_tokens=9, trace=True)
    t = r.expert_trace
    args = model.args
    moe_layers = [i for i in range(args.num_hidden_layers) if args.is_moe_layer(i)]
    assert t.layers == moe_layers and len(t.experts) == len(t.weights) == 9
    for e, w in zip(t.experts, t.weights):
        assert e.shape == w.shape == (len(moe_layers), args.num_experts_per_tok)
        assert all(len(set(row)) == args.num_experts_per_tok for row in e)  # distinct experts per token
        np.testing.assert_allclose(w.sum(-1), args.routed_scaling_factor, rtol=1e-5)  # normalised, then scaled
    assert (t.load.sum(axis=1) == 9 * args.num_experts_per_tok).all()
    assert generate(model, tok, PROMPT, max_tokens=3).expert_trace is None  # off by default


def test_prompt_cache_reuse_gives_the_same_logits_as_a_fresh_prefill(v3):
    model, tok = v3
    pc = PromptCache(model)
    first = generate(model, tok, PROMPT, max_tokens=6, prompt_cache=pc)
    assert pc.tokens == PROMPT + first.tokens and pc.cache[0].offset == len(pc.tokens)
    turn2 = PROMPT + first.tokens + [20, 21, 22]
    todo = pc.reuse(turn2)
    assert todo == [20, 21, 22]
    cached = model(mx.array(todo)[None], pc.cache)[:, -1]
    fresh = model(mx.array(turn2)[None])[:, -1]
    assert relative_error(cached, fresh) < 1e-5
    # and a diverging prompt trims back to the common prefix
    pc2 = PromptCache(model)
    generate(model, tok, PROMPT, max_tokens=4, prompt_cache=pc2)
    assert pc2.reuse(PROMPT[:3] + [30, 31]) == [30, 31] and pc2.cache[0].offset == 3
    again = generate(model, tok, PROMPT[:3] + [30, 31], max_tokens=5, prompt_cache=pc2)
    assert again.tokens == generate(model, tok, PROMPT[:3] + [30, 31], max_tokens=5).tokens


def test_stop_strings_and_eos(v3, monkeypatch):
    model, tok = v3
    full = generate(model, tok, PROMPT, max_tokens=12)
    words = full.text.split()
    stop_word = words[3]
    cut = generate(model, tok, PROMPT, max_tokens=12, stop=[stop_word])
    assert cut.finish_reason == "stop" and stop_word not in cut.text
    assert full.text.startswith(cut.text)
    # EOS (</s>, id 2) ends generation and is not part of the text
    real = type(model).logits
    monkeypatch.setattr(type(model), "logits", lambda self, h: real(self, h).at[..., 2].add(1e6))
    ended = generate(model, tok, PROMPT, max_tokens=12)
    assert ended.finish_reason == "stop" and ended.tokens == [] and ended.text == ""


def test_quantized_kv_cache_with_mla():
    cfg = dict(
        model_type="deepseek_v3", vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=32, v_head_dim=16,
    )
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(cfg))
    ids = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    full = model(ids)
    cache = make_cache(model, kv_bits=8, kv_group_size=32)
    steps = [model(ids[:, :3], cache)] + [model(ids[:, t : t + 1], cache) for t in range(3, 8)]
    assert relative_error(mx.concatenate(steps, axis=1), full) < 0.02
    stored = cache[0].keys[0]
    assert stored.dtype == mx.uint32  # the latent is stored quantized


def test_generate_command_json(v3, capsys, tmp_path):
    from mlx_deepseek.cli import main

    model, _ = v3
    folder = tmp_path / "m"
    import shutil

    from conftest import FIXTURES

    shutil.copytree(FIXTURES / "deepseek_v3", folder)
    write_tokenizer(folder)
    assert main(["generate", "--model", str(folder), "--prompt", "w5 w6", "--max-tokens", "6", "--json", "--mtp", "--dtype", "float32"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("text", "reasoning", "answer", "generation_tps", "prompt_tps", "peak_memory_gb", "mtp_acceptance", "experts"):
        assert key in d
    assert d["generation_tokens"] == 6 and len(d["experts"]["experts"]) == 6
    assert sum(d["experts"]["load"][0]) == 6 * model.args.num_experts_per_tok


def test_compiled_decoding_sees_changed_weights(v3):
    """The compiled decode graph takes the weights as inputs: fine-tuned weights take effect at once."""
    from mlx_deepseek.generate import generate_tokens

    model, tok = v3
    before = [t for new in generate_tokens(model, PROMPT, max_tokens=8) for t in new]
    saved = model.lm_head.weight
    try:
        model.lm_head.weight = saved + 0.5 * mx.random.normal(saved.shape, key=mx.random.key(1))
        after = [t for new in generate_tokens(model, PROMPT, max_tokens=8) for t in new]
        uncompiled = generate(model, tok, PROMPT, max_tokens=8, trace=True).tokens  # traced runs are not compiled
    finally:
        model.lm_head.weight = saved
    assert before != after and after == uncompiled


@pytest.mark.parametrize("how", ["length", "stop", "eos"])
def test_streamed_chunks_add_up_to_the_result(v3, how, monkeypatch):
    model, tok = v3
    kwargs = {"max_tokens": 9}
    if how == "stop":
        kwargs["stop"] = [generate(model, tok, PROMPT, max_tokens=9).text.split()[4]]
    if how == "eos":  # token 2 (</s>) wins from the sixth step on
        real, calls = type(model).logits, {"n": 0}

        def late_eos(self, h):
            calls["n"] += 1
            return real(self, h).at[..., 2].add(1e6 if calls["n"] > 5 else 0.0)

        monkeypatch.setattr(type(model), "logits", late_eos)
        kwargs["trace"] = True  # uncompiled, so the patched head runs every step
    chunks = list(mlx_deepseek.generate.stream_generate(model, tok, PROMPT, **kwargs))
    result = chunks[-1].result
    assert result.finish_reason == ("length" if how == "length" else "stop")
    assert "".join(c.text for c in chunks) == result.text
    assert "".join(c.reasoning for c in chunks) == result.reasoning
    assert "".join(c.answer for c in chunks) == result.answer
    assert sum(len(c.tokens) for c in chunks) == len(result.tokens)
