"""convert/: every golden fixture through the converter, read back by this project AND by mlx-lm."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import FAMILY_FIXTURES, FIXTURES, offline_hub, relative_error, write_tokenizer

from convert import ConvertError, convert
from convert.recipes import RECIPES
from mlx_deepseek import CheckpointError, ConfigError, ModelArgs, load_model
from mlx_deepseek.cli import main as cli
from mlx_deepseek.weights import MTP_FILE, weight_files


def reference(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    return mx.array(ref["input_ids"]), ref["logits"]


def mlx_lm_logits(folder, ids):
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(folder)
    return model(ids)


def tensors(folder):
    out = {}
    for f in weight_files(folder):
        out.update(mx.load(str(f)))
    return out


def no_leftovers(parent, dst):
    """No DST and no temporary folder beside it."""
    assert not dst.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{dst.name}.")]


# ---- float: each family ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_float_conversion_loads_in_both(name, tmp_path):
    dst = tmp_path / "out"
    report = convert(FIXTURES / name, dst, dtype="float32", progress=False)
    ids, ref = reference(name)
    ours = load_model(dst)(ids)
    assert relative_error(ours, ref) < 1e-4
    assert relative_error(mlx_lm_logits(dst, ids), ours) < 1e-5
    config = json.loads((dst / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert config["torch_dtype"] == "float32"
    assert (dst / "README.md").read_text().count(str(FIXTURES / name)) >= 1
    assert report.peak_rss_bytes > 0 and report.tensors > 0
    if ModelArgs.from_file(FIXTURES / name).num_nextn_predict_layers:
        mtp = mx.load(str(dst / MTP_FILE))
        assert mtp and all(k.startswith("mtp.0.") for k in mtp)
        assert not any(k.startswith("mtp.") for f in dst.glob("model*.safetensors") for k in mx.load(str(f)))


def test_fp8_default_dtype_is_bfloat16(tmp_path):
    dst = tmp_path / "out"
    convert(FIXTURES / "deepseek_v3_fp8", dst, progress=False)
    config = json.loads((dst / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and "quantization_config" not in config
    w = tensors(dst)
    assert w["model.layers.1.mlp.switch_mlp.up_proj.weight"].dtype == mx.bfloat16
    assert w["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    ids, ref = reference("deepseek_v3_fp8")
    assert relative_error(load_model(dst, dtype="float32")(ids), ref) < 2e-2  # bf16 rounding


def test_sharded_output_and_drop_mtp(tmp_path):
    dst = tmp_path / "out"
    convert(FIXTURES / "deepseek_v3", dst, dtype="float32", shard_size="40KB", drop_mtp=True, progress=False)
    shards = sorted(p.name for p in dst.glob("model-*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not list(dst.glob("mtp*"))
    assert json.loads((dst / "config.json").read_text())["num_nextn_predict_layers"] == 0
    ids, ref = reference("deepseek_v3")
    ours = load_model(dst)(ids)
    assert relative_error(ours, ref) < 1e-4
    assert relative_error(mlx_lm_logits(dst, ids), ours) < 1e-5


def test_sharded_mtp_is_read_back(tmp_path):
    dst = tmp_path / "out"
    convert(FIXTURES / "deepseek_v3", dst, dtype="float32", shard_size="20KB", progress=False)
    assert len(list(dst.glob("mtp-*-of-*.safetensors"))) > 1
    model = load_model(dst)
    src = load_model(FIXTURES / "deepseek_v3", dtype="float32")
    ids, _ = reference("deepseek_v3")
    h = src.model(ids)
    assert relative_error(model.mtp_step(h, ids)[1], src.mtp_step(h, ids)[1]) == 0.0


def test_tokenizer_files_are_copied(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "qwen2", src)
    write_tokenizer(src, 160)
    (src / "generation_config.json").write_text("{}")
    (src / "modeling_evil.py").write_text("raise SystemExit")
    convert(src, tmp_path / "out", progress=False)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert "modeling_evil.py" not in names


# ---- quantization -------------------------------------------------------------------------------------
def mlx_lm_quantized_error(tmp_path, name, bits, group_size):
    """What mlx_lm.convert's own quantization of the same float weights costs (vs the reference)."""
    from mlx_lm.convert import convert as mlx_lm_convert

    flt = tmp_path / f"{name}-float"
    convert(FIXTURES / name, flt, dtype="float32", progress=False)
    write_tokenizer(flt)
    out = tmp_path / f"{name}-mlx-lm-q"
    mlx_lm_convert(str(flt), str(out), quantize=True, q_bits=bits, q_group_size=group_size)
    ids, ref = reference(name)
    return relative_error(mlx_lm_logits(out, ids), ref)


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2_lite", "llama_gqa"])
def test_quantized_uniform_and_mixed(name, tmp_path):
    ids, ref = reference(name)
    theirs = mlx_lm_quantized_error(tmp_path, name, 4, 32)
    errors = {}
    for recipe in ("uniform", "mixed"):
        dst = tmp_path / recipe
        convert(FIXTURES / name, dst, dtype="float32", q_bits=4, q_group_size=32, recipe=recipe, progress=False)
        ours = load_model(dst)(ids)
        assert relative_error(mlx_lm_logits(dst, ids), ours) < 1e-5  # the same folder, both loaders
        errors[recipe] = relative_error(ours, ref)
        block = json.loads((dst / "config.json").read_text())
        assert block["quantization"] == block["quantization_config"]
        assert block["quantization"]["bits"] == 4 and block["quantization"]["group_size"] == 32
    assert errors["uniform"] <= theirs * 1.001 + 1e-6, (errors, theirs)
    assert errors["mixed"] <= errors["uniform"] + 1e-6, errors


def test_mixed_recipe_block(tmp_path):
    dst = tmp_path / "out"
    convert(FIXTURES / "deepseek_v3", dst, dtype="float32", q_bits=3, q_group_size=32, recipe="mixed",
            high_bits=8, progress=False)
    q = json.loads((dst / "config.json").read_text())["quantization"]
    high = {"group_size": 32, "bits": 8, "mode": "affine"}
    assert q["model.layers.0.self_attn.o_proj"] == high
    assert q["model.layers.1.mlp.shared_experts.gate_proj"] == high
    assert q["model.embed_tokens"] == high and q["lm_head"] == high
    assert "model.layers.1.mlp.switch_mlp.up_proj" not in q  # the default: 3 bits
    assert q["model.layers.1.mlp.switch_mlp.down_proj"] is False  # input width 16: not a multiple of 32
    w = tensors(dst)
    assert w["model.layers.1.mlp.switch_mlp.up_proj.weight"].dtype == mx.uint32
    assert w["model.layers.1.mlp.gate.weight"].dtype == mx.float32  # the router is never quantized
    assert w["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    mtp = mx.load(str(dst / MTP_FILE))
    assert mtp["mtp.0.block.mlp.switch_mlp.up_proj.weight"].dtype == mx.uint32
    model = load_model(dst)
    assert model.layers[1].mlp.switch_mlp.gate_up_proj.bits == 3 and model.layers[0].self_attn.o_proj.bits == 8


def test_quantized_fp8_source_matches_mlx_lm(tmp_path):
    dst = tmp_path / "out"
    convert(FIXTURES / "deepseek_v3_fp8", dst, dtype="float32", q_bits=4, q_group_size=32, progress=False)
    ids, ref = reference("deepseek_v3_fp8")
    ours = load_model(dst)(ids)
    assert relative_error(mlx_lm_logits(dst, ids), ours) < 1e-5
    assert relative_error(ours, ref) <= mlx_lm_quantized_error(tmp_path, "deepseek_v3_fp8", 4, 32) * 1.001 + 1e-6


def test_dequantize_and_experts_only(tmp_path):
    q, d = tmp_path / "q", tmp_path / "d"
    convert(FIXTURES / "deepseek_v2_lite", q, dtype="float32", q_bits=4, q_group_size=32, recipe="experts-only",
            progress=False)
    w = tensors(q)
    assert w["model.layers.1.mlp.switch_mlp.up_proj.weight"].dtype == mx.uint32
    assert w["model.layers.1.self_attn.o_proj.weight"].dtype == mx.float32
    report = convert(q, d, dequantize=True, verify=True, progress=False)
    assert "quantization" not in json.loads((d / "config.json").read_text())
    assert all(v.dtype == mx.float32 for v in tensors(d).values())
    ids, _ = reference("deepseek_v2_lite")
    assert relative_error(load_model(d)(ids), load_model(q)(ids)) < 1e-5
    assert report.verify_error < 1e-5


def test_already_quantized_source_needs_a_choice(tmp_path):
    q = tmp_path / "q"
    convert(FIXTURES / "llama_mha", q, q_bits=8, progress=False)
    with pytest.raises(ConvertError, match="already quantized"):
        convert(q, tmp_path / "again", progress=False)
    with pytest.raises(ConvertError, match="not quantized"):
        convert(FIXTURES / "llama_mha", tmp_path / "x", dequantize=True, progress=False)
    convert(q, tmp_path / "requant", q_bits=4, progress=False)  # dequantize + quantize
    assert json.loads((tmp_path / "requant" / "config.json").read_text())["quantization"]["bits"] == 4


def test_list_recipes(capsys):
    assert cli(["convert", "--list-recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in RECIPES) and {"uniform", "mixed"} <= set(RECIPES)


# ---- to the hub layout ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in FAMILY_FIXTURES if n != "deepseek_v3_fp8"])
def test_round_trip_hf_mlx_hf_is_exact(name, tmp_path):
    mlx_dir, hf_dir = tmp_path / "mlx", tmp_path / "hf"
    convert(FIXTURES / name, mlx_dir, dtype="float32", shard_size="30KB", progress=False)
    convert(mlx_dir, hf_dir, to="hf", progress=False)
    src, out = tensors(FIXTURES / name), tensors(hf_dir)
    args = ModelArgs.from_file(FIXTURES / name)
    n = args.num_hidden_layers
    copies = {f"model.layers.{n}.embed_tokens.weight": "model.embed_tokens.weight",
              f"model.layers.{n}.shared_head.head.weight": "lm_head.weight"} if args.num_nextn_predict_layers else {}
    assert set(out) == set(src)
    for k, v in src.items():
        expected = src[copies[k]] if k in copies else v  # MTP's copies of the main embedding and head
        assert out[k].dtype == expected.dtype and mx.array_equal(out[k], expected).item(), k
    back = ModelArgs.from_file(hf_dir)
    for field in ("model_type", "hidden_size", "num_hidden_layers", "q_lora_rank", "kv_lora_rank", "n_routed_experts",
                  "topk_method", "scoring_func", "routed_scaling_factor", "tie_word_embeddings", "num_nextn_predict_layers"):
        assert getattr(back, field) == getattr(args, field), field
    config = json.loads((hf_dir / "config.json").read_text())
    assert "rope_parameters" not in config and "quantization" not in config and config["architectures"]
    ids, ref = reference(name)
    assert relative_error(load_model(hf_dir)(ids), ref) < 1e-4


def test_quantized_model_to_hf(tmp_path):
    """A quantized (e.g. fine-tuned) MLX model goes back to float hub tensors."""
    q, hf = tmp_path / "q", tmp_path / "hf"
    convert(FIXTURES / "deepseek_v3", q, dtype="float32", q_bits=8, q_group_size=32, progress=False)
    convert(q, hf, to="hf", progress=False)
    out = tensors(hf)
    assert out["model.layers.1.mlp.experts.3.up_proj.weight"].shape == (16, 64)
    assert out["model.layers.0.self_attn.kv_b_proj.weight"].shape == (4 * 32, 32)
    assert all(v.dtype == mx.float32 for v in out.values())
    ids, _ = reference("deepseek_v3")
    assert relative_error(load_model(hf)(ids), load_model(q)(ids)) < 1e-5
    with pytest.raises(ConvertError, match="choose one"):
        convert(q, tmp_path / "x", to="hf", q_bits=4, progress=False)


# ---- hub id, atomic writes, bad input --------------------------------------------------------------------
def test_hub_id_from_offline_cache(tmp_path):
    env = offline_hub(tmp_path / "hub", "deepseek-ai/tiny-v2", "deepseek_v2_lite")
    dst = tmp_path / "out"
    cmd = [sys.executable, "-m", "mlx_deepseek.cli", "convert", "deepseek-ai/tiny-v2", "-o", str(dst), "--dtype", "float32"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ids, ref = reference("deepseek_v2_lite")
    assert relative_error(load_model(dst)(ids), ref) < 1e-4
    missing = subprocess.run(cmd[:4] + ["deepseek-ai/not-cached", "-o", str(tmp_path / "m")], env=env,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "deepseek-ai/not-cached" in missing.stderr
    assert not (tmp_path / "m").exists()


def test_existing_destination(tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    assert cli(["convert", str(FIXTURES / "llama_mha"), "-o", str(dst), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (dst / "keep.txt").exists()
    assert cli(["convert", str(FIXTURES / "llama_mha"), "-o", str(dst), "--overwrite", "--no-progress"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()
    with pytest.raises(ConvertError, match="source folder"):
        convert(dst, dst, overwrite=True, dequantize=True, progress=False)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_conversion_leaves_nothing(error, tmp_path, monkeypatch):
    import convert.writer as writer

    def boom(self):
        raise error()

    monkeypatch.setattr(writer.ShardWriter, "flush", boom)
    dst = tmp_path / "out"
    with pytest.raises(error):
        convert(FIXTURES / "deepseek_v3", dst, q_bits=4, progress=False)
    no_leftovers(tmp_path, dst)


def _bad(tmp_path, name, edit):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / name, src)
    edit(src)
    return src


def _truncate(f, keep):
    data = f.read_bytes()
    f.write_bytes(data[: keep(len(data))])


BAD_INPUTS = {
    "missing config.json": ("llama_mha", lambda s: (s / "config.json").unlink(), "config.json"),
    "unsupported model_type": (
        "llama_mha",
        lambda s: (s / "config.json").write_text(json.dumps({**json.loads((s / "config.json").read_text()), "model_type": "mixtral"})),
        "model_type='mixtral'",
    ),
    "truncated shard": ("llama_gqa", lambda s: _truncate(s / "model-00002-of-00002.safetensors", lambda n: n - 100),
                        "model-00002-of-00002.safetensors: truncated"),
    "corrupt header": ("llama_mha", lambda s: _truncate(s / "model.safetensors", lambda n: 20), "model.safetensors"),
    "index names a missing shard": ("llama_gqa", lambda s: (s / "model-00001-of-00002.safetensors").unlink(),
                                    "model-00001-of-00002.safetensors"),
    "pickle-only weights": ("llama_mha", lambda s: (s / "model.safetensors").rename(s / "pytorch_model.bin"), "pickle"),
    "weights of another model": (
        "llama_mha",
        lambda s: (s / "config.json").write_text(json.dumps({**json.loads((s / "config.json").read_text()), "hidden_size": 32})),
        "shape",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_clear_error_and_no_output(case, tmp_path, capsys):
    name, edit, message = BAD_INPUTS[case]
    src = _bad(tmp_path, name, edit)
    dst = tmp_path / "out"
    assert cli(["convert", str(src), "-o", str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "mlx-deepseek convert: error:" in err and message in err, err
    no_leftovers(tmp_path, dst)


def test_incomplete_experts_are_reported(tmp_path):
    import mlx.core as mx_

    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "deepseek_moe", src)
    w = mx_.load(str(src / "model.safetensors"))
    w = {k: v for k, v in w.items() if "experts.5." not in k}
    mx_.save_safetensors(str(src / "model.safetensors"), w)
    with pytest.raises(CheckpointError, match="7 of 8 experts"):
        convert(src, tmp_path / "out", progress=False)
    no_leftovers(tmp_path, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        convert(FIXTURES / "configs" / "deepseek-v3", tmp_path / "o2", progress=False)  # config only
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / "deepseek_moe", bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 99}))
    with pytest.raises(ConfigError, match="num_experts_per_tok=99"):
        convert(bad, tmp_path / "o3", progress=False)


def test_cli_convert_verify_prints_error(tmp_path, capsys):
    dst = tmp_path / "out"
    assert cli(["convert", str(FIXTURES / "deepseek_v3"), "-o", str(dst), "--q-bits", "8", "--q-group-size", "32",
                "--verify", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "verify: relative logits error" in out and "peak RSS" in out
    err = float(out.split("relative logits error ")[1].split()[0])
    assert 0 < err < 0.5  # 8-bit on a tiny random MoE: some routing decisions flip


def test_bench_convert_small(tmp_path, capsys):
    """The benchmark's FP8 hub checkpoint (multi-shard) through both tools: bit-identical outputs."""
    args = ["bench", "convert", "--variants", "fp8", "--layers", "2", "--scale", "0.05", "--shard-size", "4MB",
            "--dir", str(tmp_path), "--json"]
    assert cli(args) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["tool"] for r in rows] == ["mlx-deepseek convert", "mlx_lm.convert"] and rows[0]["shards"] > 1
    c = rows[0]["compare"]
    assert c["names_match"] and c["identical"] == c["tensors_mlx_lm"] > 0
