"""load / load_model: local folders, hub ids through a local Hugging Face cache (offline), tokenizers."""

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, offline_hub, relative_error, write_tokenizer

from mlx_deepseek import load, load_model
from mlx_deepseek.tokenizer import TokenizerError


def test_load_returns_model_and_tokenizer(fixture_copy):
    folder = fixture_copy("deepseek_v2_lite")
    write_tokenizer(folder)
    model, tokenizer = load(folder, dtype="float32")
    ids = tokenizer.encode("w5 w6 w7", add_special_tokens=False)
    assert ids == [5, 6, 7]
    assert model(mx.array([ids])).shape == (1, 3, model.args.vocab_size)


def test_load_without_tokenizer_says_what_to_do(fixture_copy):
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load(fixture_copy("qwen2"))


def test_hub_id_from_offline_cache(tmp_path):
    """A hub id resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1 (no network is touched)."""
    script = (
        "import mlx.core as mx, numpy as np, mlx_deepseek;"
        "m = mlx_deepseek.load_model('deepseek-ai/tiny-v3', dtype='float32');"
        f"ref = np.load('{FIXTURES / 'deepseek_v3' / 'reference.npz'}');"
        "out = np.array(m(mx.array(ref['input_ids'])));"
        "print(float(np.abs(out - ref['logits']).max() / np.abs(ref['logits']).max()))"
    )
    env = offline_hub(tmp_path / "hub", "deepseek-ai/tiny-v3", "deepseek_v3")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) < 1e-4
    missing = subprocess.run(
        [sys.executable, "-c", "import mlx_deepseek; mlx_deepseek.load_model('deepseek-ai/not-cached')"],
        env=env, capture_output=True, text=True,
    )
    assert missing.returncode != 0 and "deepseek-ai/not-cached" in missing.stderr


def test_bfloat16_moe_runs_on_this_device():
    """bf16 weights everywhere, except routed experts on the CPU, whose gather_mm needs float32."""
    ids = np.load(FIXTURES / "deepseek_v3" / "reference.npz")["input_ids"]
    full = load_model(FIXTURES / "deepseek_v3", dtype="float32")(mx.array(ids))
    model = load_model(FIXTURES / "deepseek_v3", dtype="bfloat16")
    assert model.layers[0].self_attn.o_proj.weight.dtype == mx.bfloat16
    on_cpu = mx.default_device() == mx.cpu
    assert model.layers[1].mlp.switch_mlp.gate_up_proj.weight.dtype == (mx.float32 if on_cpu else mx.bfloat16)
    half = model(mx.array(ids)).astype(mx.float32)
    assert bool(mx.all(mx.isfinite(half)))
    # bf16 rounding may flip close expert choices, so compare loosely: the same next-token ranking mostly
    agree = np.mean(np.array(half.argmax(-1)) == np.array(full.argmax(-1)))
    assert agree > 0.7 and relative_error(half, full) < 0.5


def test_narrow_quantized_layers_load_dequantized(tmp_path):
    """What CUDA gets (loading.for_device): quantized layers with inputs narrower than the kernels handle are
    dequantized and marked float; the model computes the same logits, the wider layers stay quantized."""
    import mlx.nn as nn
    from convert import convert

    from mlx_deepseek.config import ModelArgs
    from mlx_deepseek.loading import dequantize_narrow
    from mlx_deepseek.models import Model
    from mlx_deepseek.weights import quantize_like, read_weights

    q = tmp_path / "q4"
    convert(FIXTURES / "deepseek_v3", q, q_bits=4, q_group_size=32, progress=False)
    ids = mx.array(np.load(FIXTURES / "deepseek_v3" / "reference.npz")["input_ids"])
    quantized = load_model(q)
    args = ModelArgs.from_file(q)
    weights = dequantize_narrow(read_weights(q, args, None, []), args, min_input=64)
    model = Model(args)
    quantize_like(model, args.quantization, set(weights))
    model.load_weights(list(weights.items()))  # strict: no scales left over, none missing
    attn = model.layers[0].self_attn
    assert type(attn.q_b_proj) is nn.Linear and args.quantization["model.layers.0.self_attn.q_b_proj"] is False
    assert isinstance(attn.q_a_proj, nn.QuantizedLinear) and isinstance(attn.o_proj, nn.QuantizedLinear)
    assert "model.layers.0.self_attn.q_b_proj" not in quantized.args.quantization
    assert relative_error(model(ids), quantized(ids)) < 1e-5
