"""Expert offloading: exact greedy outputs, memory within the budget, per-layer stats, policies, layouts."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, write_tokenizer
from mlx.utils import tree_flatten

from mlx_deepseek.bench import V2_LITE_SHAPE
from mlx_deepseek.config import ModelArgs
from mlx_deepseek.generate import generate
from mlx_deepseek.loading import load_model
from mlx_deepseek.models import Model
from mlx_deepseek.offload import parse_memory
from mlx_deepseek.offload.policies import LRU, LFUDecay, load_profile, replay, replay_table, split_slots
from mlx_deepseek.offload.source import expert_layout
from mlx_deepseek.weights import CheckpointError, save_model

# routed experts dominate: 64 experts x 3 MoE layers (2 main + MTP) of 64x128 SwiGLUs; 4 chosen per token
TINY = dict(
    V2_LITE_SHAPE, vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=128,
    num_attention_heads=2, num_key_value_heads=2, n_routed_experts=64, num_experts_per_tok=4, kv_lora_rank=32,
    qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, num_hidden_layers=3, n_shared_experts=1,
    max_position_embeddings=512,
)
PROMPT = [(7 * i) % 120 + 3 for i in range(40)]  # 40 tokens choose more distinct experts than a small bank holds


def _checkpoint(folder, bits):
    mx.random.seed(1)
    config = dict(TINY)
    model = Model(ModelArgs.from_dict(config))
    for _, m in model.named_modules():  # a router that spreads tokens over the experts
        if hasattr(m, "e_score_correction_bias"):
            m.weight = mx.random.normal(m.weight.shape) / 8
    if bits:
        import mlx.nn as nn

        nn.quantize(model, group_size=64, bits=bits,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
        config["quantization"] = {"group_size": 64, "bits": bits}
    mx.eval(model.parameters())
    save_model(model, folder, config)
    write_tokenizer(folder, 128)
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    return {bits: _checkpoint(root / f"bits{bits}", bits) for bits in (None, 4)}


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    from mlx_deepseek.tokenizer import load_tokenizer

    return load_tokenizer(ckpt[None])


@pytest.fixture(scope="module")
def resident(ckpt, tokenizer):
    """The all-resident model's greedy tokens (plain and MTP) and expert trace, per checkpoint."""
    out = {}
    for bits, path in ckpt.items():
        model = load_model(path)
        plain = generate(model, tokenizer, PROMPT, max_tokens=24, trace=True)
        mtp = generate(model, tokenizer, PROMPT, max_tokens=24, mtp=True)
        out[bits] = (plain.tokens, mtp.tokens, plain.expert_trace)
    return out


@pytest.mark.parametrize("bits,memory,options,mtp", [
    (None, "12.5%", {"policy": "lru"}, False),
    (4, "25%", {"policy": "lfu"}, False),
    (4, "12.5%", {"policy": "lru", "prefetch": True}, False),
    (None, "25%", {"policy": "lru", "reader": "pread", "write_through": False}, False),
    (4, "25%", {"policy": "lru"}, True),
])
def test_greedy_tokens_identical_to_all_resident(ckpt, tokenizer, resident, bits, memory, options, mtp):
    model = load_model(ckpt[bits], expert_memory=memory, offload=options)
    r = generate(model, tokenizer, PROMPT, max_tokens=24, mtp=mtp, trace=not mtp)
    assert r.tokens == resident[bits][1 if mtp else 0]
    assert len(r.tokens) == 24
    if not mtp:  # the routing trace still works on the offloaded (uncompiled) path
        assert [e.tolist() for e in r.expert_trace.experts] == [e.tolist() for e in resident[bits][2].experts]

    stats = r.to_dict()["offload"]
    assert stats["policy"] == options["policy"] and stats["residency"] <= float(memory[:-1]) / 100
    decode, prefill = stats["decode"], stats["prefill"]
    assert prefill["misses"] > 0 and prefill["tokens"] == len(PROMPT)
    k = TINY["num_experts_per_tok"]
    for layer in decode["layers"][:2]:  # main-model MoE layers: k distinct experts per decoded token
        if not mtp:
            assert layer["hits"] + layer["misses"] == layer["tokens"] * k == 24 * k  # the loop runs a step ahead
        bank = next(b for b in model.offloader.banks if b.layer == layer["layer"])
        assert layer["bytes_read"] == (layer["misses"] + layer["prefetched"]) * bank.expert_bytes
        assert 0.0 <= layer["hit_rate"] <= 1.0 and layer["stall_s"] >= 0.0
    assert 0.0 < decode["hit_rate"] < 1.0
    assert decode["bytes_read_per_token"] == pytest.approx(decode["bytes_read"] / decode["tokens"])
    if options.get("prefetch"):
        assert decode["prefetched"] > 0


def test_offloaded_load_keeps_experts_out_of_memory(ckpt, tokenizer):
    """Peak memory of load + generation stays within budget + non-expert weights + a stated overhead
    (1 MB here: the KV cache, activations and the prefill's group outputs of this tiny model)."""
    path = ckpt[None]
    layout = expert_layout(path, ModelArgs.from_file(path))
    budget = parse_memory("25%", layout.total_bytes)
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = load_model(path, expert_memory="25%")
    generate(model, tokenizer, PROMPT, max_tokens=24)
    peak = mx.get_peak_memory() - before
    non_expert = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert model.offloader.bank_bytes <= budget
    assert non_expert < layout.total_bytes / 10  # the experts dominate, so the budget matters
    assert peak <= budget + non_expert + 1_000_000, (peak, budget, non_expert)
    assert peak < layout.total_bytes / 2  # far below what loading every expert needs


def test_hf_layout_offloaded_logits_equal_all_resident():
    """Per-expert (hub) tensors are offloaded too; a batch needing more experts than slots runs in groups."""
    path = FIXTURES / "deepseek_v3"
    ids = mx.array(np.load(path / "reference.npz")["input_ids"])
    ref = load_model(path)(ids)
    model = load_model(path, expert_memory="50%")
    assert [b.n_slots for b in model.offloader.banks] == [8, 8, 8]
    assert np.array_equal(np.array(model(ids)), np.array(ref))
    with pytest.raises(CheckpointError, match="convert"):
        load_model(FIXTURES / "deepseek_v3_fp8", expert_memory="50%")


def test_budget_parsing_and_too_small_budget(ckpt):
    assert parse_memory("8GB", 0) == 8 * 10**9 and parse_memory("512MiB", 0) == 512 * 2**20
    assert parse_memory("25%", 1000) == 250 and parse_memory(12345, 0) == 12345
    for bad in ("lots", "0%", "150%"):
        with pytest.raises(ValueError):
            parse_memory(bad, 100)
    with pytest.raises(ValueError, match="offloading needs at least"):
        load_model(ckpt[None], expert_memory="1%")


def test_lru_and_lfu_victims():
    lru = LRU(4)
    resident = np.array([0, 1, 2, 3])
    for e in (0, 1, 2, 3, 0):
        lru.access(np.array([e]), np.array([1]))
    assert lru.victim(resident, np.ones(4, bool)) == 1  # least recently used
    assert lru.victim(np.array([0, -1, 2, 3]), np.ones(4, bool)) == 1  # a free slot first
    lfu = LFUDecay(4, decay=0.5)
    lfu.access(np.array([0]), np.array([8]))  # popular long ago ...
    for _ in range(4):
        lfu.access(np.array([1, 2, 3]), np.array([1, 1, 1]))  # ... then never again
    assert lfu.victim(resident, np.ones(4, bool)) == 0
    assert lfu.victim(resident, np.array([False, True, True, True])) in (1, 2, 3)


def test_trace_replay_belady_is_the_optimum():
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, 33) ** 1.1
    trace = [np.stack([rng.choice(32, 4, replace=False, p=p / p.sum()) for _ in range(2)]) for _ in range(300)]
    rows = replay_table(trace, 32, (0.125, 0.25, 0.5, 1.0), top_k=4)
    for row in rows:
        assert row["belady"] >= max(row["lru"], row["lfu"]) - 1e-12
    assert rows[0]["lru"] < rows[2]["lru"]
    layer0 = [t[0] for t in trace]
    distinct = len(np.unique(np.concatenate(layer0)))
    assert replay(layer0, 32, 32, "lru") == pytest.approx(1 - distinct / (4 * len(layer0)))


def test_profile_splits_the_budget_and_pins_hot_experts(ckpt, tokenizer, resident):
    trace = resident[None][2]
    profile = load_profile(trace)
    assert set(profile) == {1, 2} and all(len(v) == 64 for v in profile.values())
    assert load_profile({"experts": trace.to_dict()}).keys() == profile.keys()  # a generate --json output
    skewed, flat = np.array([100.0] + [0.0] * 63), np.ones(64)
    assert split_slots(24, 2, 64, 4, [skewed, flat]) == [4, 20]
    assert split_slots(24, 2, 64, 4) == [12, 12]

    model = load_model(ckpt[None], expert_memory="25%", offload={"profile": trace, "pin": 0.5})
    main_banks = [b for b in model.offloader.banks if b.layer in profile]
    hot = {b.layer: set(b.resident[b.pinned].tolist()) for b in main_banks}
    assert all(b.pinned.sum() == b.n_slots // 2 for b in main_banks)
    r = generate(model, tokenizer, PROMPT, max_tokens=24)
    assert r.tokens == resident[None][0]
    for b in main_banks:  # pinned experts were never evicted
        assert set(b.resident[b.pinned].tolist()) == hot[b.layer]
        assert hot[b.layer] == set(np.argsort(-profile[b.layer], kind="stable")[: b.n_slots // 2].tolist())


def test_generate_command_offloads_the_bundled_model(capsys):
    from mlx_deepseek.cli import main

    args = ["generate", "--prompt", "What is 12 + 30?", "--max-tokens", "12", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--expert-memory", "25%", "--expert-policy", "lfu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == plain["tokens"] and out["text"] == plain["text"]
    assert plain["offload"] is None
    layers = out["offload"]["decode"]["layers"]
    assert [row["layer"] for row in layers][:3] == [1, 2, 3]
    assert all({"hit_rate", "bytes_read_per_token", "stall_s", "slots"} <= row.keys() for row in layers)
