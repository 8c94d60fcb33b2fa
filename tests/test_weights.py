"""Checkpoint reading: bad inputs give one clear error naming the file or tensor."""

import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

from mlx_deepseek import CheckpointError, load_model
from mlx_deepseek.config import ModelArgs
from mlx_deepseek.weights import dequantize_fp8, read_header


def _single_file(folder):
    return next(folder.glob("model.safetensors"))


def test_missing_tensor_is_listed(fixture_copy):
    folder = fixture_copy("deepseek_v2_lite")
    from safetensors.numpy import load_file, save_file

    path = _single_file(folder)
    weights = load_file(path)
    del weights["model.layers.1.mlp.experts.2.up_proj.weight"]
    del weights["model.norm.weight"]
    save_file(weights, str(path))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    text = str(e.value)
    assert "model.norm.weight" in text and "missing" in text
    assert "experts.*.up_proj.weight" in text  # a layer with one expert short


def test_wrong_shape_and_unexpected_are_listed(fixture_copy):
    folder = fixture_copy("qwen2")
    from safetensors.numpy import load_file, save_file

    path = _single_file(folder)
    weights = load_file(path)
    w = weights["model.layers.0.self_attn.q_proj.weight"]
    weights["model.layers.0.self_attn.q_proj.weight"] = w[:-1]
    weights["model.layers.0.self_attn.extra.weight"] = w
    save_file(weights, str(path))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    text = str(e.value)
    assert f"model.layers.0.self_attn.q_proj.weight: expected {w.shape}, found {w[:-1].shape}" in text
    assert "unexpected: model.layers.0.self_attn.extra.weight" in text


def test_truncated_safetensors(fixture_copy):
    folder = fixture_copy("qwen2")
    path = _single_file(folder)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated safetensors file"):
        load_model(folder)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(folder)
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!" + data[100:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_model(folder)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text((FIXTURES / "llama_mha" / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    assert "pytorch_model.bin" in str(e.value) and "safetensors" in str(e.value)


def test_index_naming_a_missing_shard(fixture_copy):
    folder = fixture_copy("llama_gqa")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).unlink()
    with pytest.raises(CheckpointError, match=shard):
        load_model(folder)


def test_unknown_model_type(fixture_copy):
    folder = fixture_copy("llama_mha")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    with pytest.raises(ValueError, match="model_type='falcon'"):
        load_model(folder)


def test_fp8_dequantization_handles_partial_blocks():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((130, 300)).astype(np.float32)
    q = mx.to_fp8(mx.array(w))
    s = mx.array(rng.uniform(0.5, 2.0, (2, 3)).astype(np.float32))
    out = np.array(dequantize_fp8(q, s, mx.float32))
    ref = np.array(mx.from_fp8(q, dtype=mx.float32)) * np.repeat(np.repeat(np.array(s), 128, 0), 128, 1)[:130, :300]
    np.testing.assert_array_equal(out, ref)


def test_fp8_checkpoint_keeps_float32_exact():
    model = load_model(FIXTURES / "deepseek_v3_fp8", dtype="float32")
    hub = mx.load(str(FIXTURES / "deepseek_v3_fp8" / "model.safetensors"))
    name = "model.layers.0.mlp.gate_proj"
    q, s = hub[name + ".weight"], hub[name + ".weight_scale_inv"]
    assert model.layers[0].mlp.gate_proj.weight.dtype == mx.float32
    np.testing.assert_array_equal(np.array(model.layers[0].mlp.gate_proj.weight), np.array(dequantize_fp8(q, s, mx.float32)))
    default = load_model(FIXTURES / "deepseek_v3_fp8")
    assert default.layers[0].mlp.gate_proj.weight.dtype == mx.bfloat16


def test_header_reader_checks_lengths(fixture_copy):
    folder = fixture_copy("qwen2")
    header = read_header(_single_file(folder))
    assert "model.embed_tokens.weight" in header
    assert ModelArgs.from_file(folder).tie_word_embeddings


def test_routed_experts_join_on_load_and_split_on_save(tmp_path):
    """A quantized checkpoint in mlx-lm's layout (gate_proj, up_proj apart) loads with the two joined as
    gate_up_proj, computes what mlx-lm computes from the same folder, and saves back byte for byte."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from mlx_deepseek.bench import random_checkpoint
    from mlx_deepseek.weights import save_model

    folder = random_checkpoint(tmp_path / "q", layers=2, scale=0.0625, bits=4)
    stored = mx.load(str(folder / "model.safetensors"))
    assert "model.layers.1.mlp.switch_mlp.up_proj.scales" in stored and not any("gate_up" in k for k in stored)
    model = load_model(folder)
    params = dict(tree_flatten(model.parameters()))
    assert params["model.layers.1.mlp.switch_mlp.gate_up_proj.weight"].shape[1] == 2 * model.args.moe_intermediate_size
    assert not any(".switch_mlp.gate_proj." in k or ".switch_mlp.up_proj." in k for k in params)

    ids = mx.array([[3, 17, 29, 5, 11]])
    theirs, _ = mlx_lm_load_model(folder)
    np.testing.assert_allclose(np.array(model(ids)), np.array(theirs(ids)), rtol=1e-4, atol=1e-4)

    save_model(model, tmp_path / "again", json.loads((folder / "config.json").read_text()))
    again = mx.load(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(again) == sorted(stored)
    for k in stored:
        np.testing.assert_array_equal(np.array(again[k]), np.array(stored[k]), err_msg=k)


def test_differently_quantized_gate_and_up_are_refused(tmp_path):
    from mlx_deepseek.bench import random_checkpoint

    folder = random_checkpoint(tmp_path / "q", layers=2, scale=0.0625, bits=4)
    config = json.loads((folder / "config.json").read_text())
    config["quantization"]["model.layers.1.mlp.switch_mlp.gate_proj"] = {"group_size": 64, "bits": 4}  # the default
    (folder / "config.json").write_text(json.dumps(config))
    load_model(folder)  # one half's own entry equal to the other's default setting: the same quantization
    config["quantization"]["model.layers.1.mlp.switch_mlp.gate_proj"] = {"group_size": 64, "bits": 8}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.switch_mlp: gate_proj and up_proj are quantized differently"):
        load_model(folder)
