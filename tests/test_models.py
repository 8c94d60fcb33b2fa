"""The model core against transformers' reference logits, and cached decoding against the full pass."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import FAMILY_FIXTURES, FIXTURES, relative_error

from mlx_deepseek import ModelArgs, load_model

REQUIRED = {
    "deepseek_v3", "deepseek_v3_fp8", "deepseek_v2_lite", "deepseek_v2_group",
    "qwen2", "llama_gqa", "llama_mha", "deepseek_moe",
}


def test_every_family_has_a_golden_fixture():
    assert REQUIRED <= set(FAMILY_FIXTURES)


def reference(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    return ref["input_ids"], ref["logits"]


@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_logits_match_transformers(name):
    ids, ref = reference(name)
    model = load_model(FIXTURES / name, dtype="float32")
    logits = model(mx.array(ids))
    assert logits.shape == ref.shape
    assert relative_error(logits, ref) < 1e-4


def _respell(config: dict) -> dict:
    """hub spelling (rope_theta + rope_scaling{type}) <-> transformers-5 spelling (rope_parameters)."""
    config = dict(config)
    if "rope_parameters" in config:
        params = dict(config.pop("rope_parameters"))
        config["rope_theta"] = params.pop("rope_theta")
        kind = params.pop("rope_type")
        config["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
    else:
        scaling = dict(config.pop("rope_scaling", None) or {})
        kind = scaling.pop("type", None) or scaling.pop("rope_type", "default")
        config["rope_parameters"] = {"rope_type": kind, "rope_theta": config.pop("rope_theta", 10000.0), **scaling}
    return config


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v3_fp8", "deepseek_v2_lite", "llama_gqa"])
def test_both_config_spellings_give_the_same_model(name, fixture_copy):
    folder = fixture_copy(name)
    config = json.loads((folder / "config.json").read_text())
    respelled = _respell(config)
    assert ("rope_parameters" in respelled) != ("rope_parameters" in config)
    a, b = ModelArgs.from_dict(config), ModelArgs.from_dict(respelled)
    assert (a.rope_theta, a.rope_scaling) == (b.rope_theta, b.rope_scaling)
    (folder / "config.json").write_text(json.dumps(respelled))
    ids, ref = reference(name)
    assert relative_error(load_model(folder, dtype="float32")(mx.array(ids)), ref) < 1e-4


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2_lite", "llama_gqa", "qwen2"])
def test_cached_decoding_equals_full_forward(name):
    ids, _ = reference(name)
    model = load_model(FIXTURES / name, dtype="float32")
    full = np.array(model(mx.array(ids)))
    cache = model.make_cache()
    steps = [model(mx.array(ids[:, :4]), cache)]  # a prefill chunk, then one token at a time
    steps += [model(mx.array(ids[:, t : t + 1]), cache) for t in range(4, ids.shape[1])]
    incremental = np.concatenate([np.array(s) for s in steps], axis=1)
    assert relative_error(incremental, full) < 1e-5


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2_lite", "llama_gqa"])
def test_kv_cache_bytes_per_token(name):
    ids, _ = reference(name)
    model = load_model(FIXTURES / name, dtype="float32")
    cache = model.make_cache()
    mx.eval(model(mx.array(ids), cache))
    stored = sum(c.keys[..., : c.offset, :].nbytes + c.values[..., : c.offset, :].nbytes for c in cache)
    per_token = stored / (ids.shape[0] * ids.shape[1])
    args = model.args
    assert per_token == args.kv_cache_bytes_per_token(dtype_bytes=4)
    if args.uses_mla:
        assert per_token == (args.kv_lora_rank + args.qk_rope_head_dim) * args.num_hidden_layers * 4
        assert per_token < args.mha_kv_cache_bytes_per_token(dtype_bytes=4)


def test_mtp_module_is_loaded_not_dropped():
    model = load_model(FIXTURES / "deepseek_v3", dtype="float32")
    assert len(model.mtp) == model.args.num_nextn_predict_layers == 1
    hub = mx.load(str(FIXTURES / "deepseek_v3" / "model.safetensors"))
    n = model.args.num_hidden_layers
    np.testing.assert_array_equal(np.array(model.mtp[0].eh_proj.weight), hub[f"model.layers.{n}.eh_proj.weight"])
    np.testing.assert_array_equal(
        np.array(model.mtp[0].block.mlp.gate.e_score_correction_bias),
        hub[f"model.layers.{n}.mlp.gate.e_score_correction_bias"],
    )


def test_correction_bias_changes_routing_but_not_gate_weights():
    """V3: the bias picks the experts; the gate weights come from the unbiased sigmoid scores."""
    from mlx_deepseek.models.moe import select_experts

    logits = mx.array([[0.0, 0.1, 0.2, 0.3]])
    inds, w = select_experts(logits, mx.array([0.0, 0.0, 0.0, 0.0]), 1, 1, 1, "sigmoid", "top2_sum", True, 1.0)
    assert inds.tolist() == [[3]]
    inds, w = select_experts(logits, mx.array([1.0, 0.0, 0.0, 0.0]), 2, 1, 1, "sigmoid", "top2_sum", False, 1.0)
    assert sorted(inds.tolist()[0]) == [0, 3]
    chosen = dict(zip(inds.tolist()[0], w.tolist()[0]))
    assert abs(chosen[0] - 0.5) < 1e-6  # sigmoid(0), not sigmoid(0) + bias


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v3_fp8", "deepseek_v2_lite", "deepseek_v2_group"])
@pytest.mark.parametrize("absorb_below", [0, float("inf")])
def test_mla_absorbed_and_expanded_paths_both_match(name, absorb_below):
    """MLA picks absorbed or expanded attention by length; each alone must match the reference."""
    ids, ref = reference(name)
    model = load_model(FIXTURES / name, dtype="float32")
    for layer in model.layers:
        layer.self_attn.absorb_below = absorb_below
    assert relative_error(model(mx.array(ids)), ref) < 1e-4


def test_rope_in_batch_chunks_equals_one_call():
    """MLX's CUDA RoPE rejects a decode step of 64+ rows x 8 heads at nano-r1's 16 rotated dims (block depth 128 > 64);
    on CUDA such calls go in batch chunks, which must rotate exactly as one call does, per-row offsets included."""
    import mlx.nn as nn

    from mlx_deepseek.models.rope import BatchChunkedRoPE, oversized_cuda_block

    assert oversized_cuda_block(16, (64, 8, 1, 16)) and oversized_cuda_block(16, (128, 1, 1, 16))
    assert not oversized_cuda_block(16, (48, 8, 1, 16))  # depth 64
    assert not oversized_cuda_block(16, (64, 8, 2, 16))  # two positions: the y axis takes a power of two
    assert not oversized_cuda_block(64, (512, 16, 1, 64))  # V2/V3's 32 pairs
    rope = nn.RoPE(16, traditional=True)
    x = mx.random.normal((200, 8, 1, 16), key=mx.random.key(0))
    for offset in (mx.arange(200) * 3, 7):
        assert mx.array_equal(BatchChunkedRoPE(rope, 16)(x, offset=offset), rope(x, offset=offset))


def test_fastmath_equals_mlx_ops_in_value_and_gradient():
    """On the CPU exp, softmax, logsumexp, SiLU and attention take exp as 2^(x log2 e); they must give MLX's own results
    (values and gradients) to float32 rounding, with masked scores (the dtype's lowest value) at zero weight."""
    import mlx.nn as nn

    from mlx_deepseek.models import fastmath

    assert fastmath.on_cpu()
    k1, k2, k3, k4 = mx.random.split(mx.random.key(0), 4)
    x = mx.random.normal((3, 5, 40), key=k1) * 8
    x = mx.where(mx.arange(40) < 30, x, mx.finfo(mx.float32).min)  # a masked tail
    q, k, v = (mx.random.normal((2, 4, 6, 16), key=key) for key in (k2, k3, k4))
    mask = mx.where(mx.tril(mx.ones((6, 6))) > 0, mx.random.normal((6, 6)), mx.finfo(mx.float32).min)
    pairs = [
        (fastmath.softmax, lambda a: mx.softmax(a, axis=-1, precise=True), x),
        (fastmath.logsumexp, lambda a: mx.logsumexp(a, axis=-1), x),
        (fastmath.silu, nn.silu, x[..., :30]),
        (fastmath.exp, mx.exp, x[..., :30] / 4),
        (lambda a: fastmath.attention(a, k, v, 0.25, mask),
         lambda a: mx.fast.scaled_dot_product_attention(a, k, v, scale=0.25, mask=mask), q),
    ]
    for ours, theirs, a in pairs:
        np.testing.assert_allclose(np.array(ours(a)), np.array(theirs(a)), rtol=1e-5, atol=1e-6)
        w = mx.random.normal(ours(a).shape, key=k1)
        g_ours, g_theirs = (mx.grad(lambda b, f=f: (f(b) * w).sum())(a) for f in (ours, theirs))
        np.testing.assert_allclose(np.array(g_ours), np.array(g_theirs), rtol=1e-4, atol=1e-5)
