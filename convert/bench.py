"""`mlx-deepseek bench convert`: this converter against mlx_lm.convert on the same multi-shard checkpoint.

The checkpoint is random, in the exact Hugging Face layout of DeepSeek-V2-Lite's widths (per-expert
tensors, `kv_b_proj` whole), with fewer layers so it is a few GB; as bf16, and as the V3 release's FP8
(128x128-block `F8_E4M3` weights with `weight_scale_inv`). Each tool runs in a fresh process; wall time
and that process's peak RSS (`os.wait4`) are measured, and the two outputs are compared tensor by tensor.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_deepseek.bench import V2_LITE_SHAPE

from .pipeline import parse_size

# DeepSeek-V2-Lite's widths as a deepseek_v3 config (so the FP8 release format applies; mlx-lm reads
# both). No MTP layer: mlx-lm's deepseek_v3 drops only `model.layers.61`, so it could not load one here.
V2_LITE = dict(V2_LITE_SHAPE, architectures=["DeepseekV3ForCausalLM"], num_nextn_predict_layers=0, torch_dtype="bfloat16")
_DTYPE_NAMES = {mx.bfloat16: "BF16", mx.float32: "F32", mx.uint8: "F8_E4M3"}


def _hf_tensors(config: dict):
    """(name, shape, is_projection) of every tensor of the hub layout, in file order."""
    d, heads = config["hidden_size"], config["num_attention_heads"]
    nope, rope, v, r = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"], config["kv_lora_rank"]
    yield "model.embed_tokens.weight", (config["vocab_size"], d), False
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (d,), False
        yield p + "post_attention_layernorm.weight", (d,), False
        yield p + "self_attn.q_proj.weight", (heads * (nope + rope), d), True
        yield p + "self_attn.kv_a_proj_with_mqa.weight", (r + rope, d), True
        yield p + "self_attn.kv_a_layernorm.weight", (r,), False
        yield p + "self_attn.kv_b_proj.weight", (heads * (nope + v), r), True
        yield p + "self_attn.o_proj.weight", (d, heads * v), True
        if layer < config["first_k_dense_replace"]:
            mlps = [(p + "mlp.", config["intermediate_size"])]
        else:
            yield p + "mlp.gate.weight", (config["n_routed_experts"], d), False
            yield p + "mlp.gate.e_score_correction_bias", (config["n_routed_experts"],), False
            mlps = [(p + f"mlp.experts.{e}.", config["moe_intermediate_size"]) for e in range(config["n_routed_experts"])]
            mlps.append((p + "mlp.shared_experts.", config["moe_intermediate_size"] * config["n_shared_experts"]))
        for prefix, inter in mlps:
            yield prefix + "gate_proj.weight", (inter, d), True
            yield prefix + "up_proj.weight", (inter, d), True
            yield prefix + "down_proj.weight", (d, inter), True
    yield "model.norm.weight", (d,), False
    yield "lm_head.weight", (config["vocab_size"], d), False


def _write_safetensors(path: Path, tensors: dict[str, mx.array]) -> None:
    """safetensors with the hub's dtype names (mx.save_safetensors would call FP8 bytes U8)."""
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        raw = np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).tobytes()
        header[name] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b)


def build_checkpoint(folder: Path, variant: str, layers: int, scale: float, shard_bytes: int, seed: int = 0) -> Path:
    """A random hub-layout checkpoint in shards of about `shard_bytes` (+ index, config, tokenizer)."""
    config = dict(V2_LITE, num_hidden_layers=layers)
    for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "kv_lora_rank"):
        config[key] = max(64, int(config[key] * scale) // 64 * 64)
    config["num_attention_heads"] = config["num_key_value_heads"] = max(2, int(16 * scale))
    if variant == "fp8":
        config["quantization_config"] = {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
        }
    folder.mkdir(parents=True)
    mx.random.seed(seed)
    shard, size, shards = {}, 0, []

    def flush():
        nonlocal shard, size
        if shard:
            shards.append(shard)
            _write_safetensors(folder / f"part-{len(shards):05d}", shard)
            shard, size = {}, 0

    for name, shape, proj in _hf_tensors(config):
        if name.endswith("e_score_correction_bias"):
            tensors = {name: mx.random.uniform(shape=shape) * 0.1}
        elif name.endswith("norm.weight"):
            tensors = {name: mx.ones(shape, dtype=mx.bfloat16)}
        else:
            w = mx.random.normal(shape) / math.sqrt(shape[-1])
            if proj and variant == "fp8":
                bm, bn = math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)
                s = mx.random.uniform(0.5, 1.5, (bm, bn)) * 0.02
                full = mx.repeat(mx.repeat(s, 128, 0), 128, 1)[: shape[0], : shape[1]]
                tensors = {name: mx.to_fp8(w / full), name + "_scale_inv": s}
            else:
                tensors = {name: w.astype(mx.bfloat16)}
        for k, a in tensors.items():
            mx.eval(a)
            if shard and size + a.nbytes > shard_bytes:
                flush()
            shard[k] = a
            size += a.nbytes
    flush()
    n, weight_map = len(shards), {}
    for i, names in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        (folder / f"part-{i:05d}").rename(folder / final)
        weight_map.update({k: final for k in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(folder)
    return folder


def _write_tokenizer(folder: Path) -> None:
    """mlx_lm.convert needs a tokenizer to save beside the weights: a tiny word-level one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    ))


_TIMER = (
    "import json, os, subprocess, sys, time\n"
    "tic = time.perf_counter()\n"
    "with open(sys.argv[1], 'w') as log:\n"
    "    proc = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)\n"
    "    _, status, usage = os.wait4(proc.pid, 0)\n"
    "print(json.dumps({'rc': os.waitstatus_to_exitcode(status), 'maxrss': usage.ru_maxrss,"
    " 'seconds': time.perf_counter() - tic}))\n"
)


def measure(cmd: list[str], log: Path) -> dict:
    """Wall seconds and peak RSS of one fresh process. A small timer process starts it: Linux counts the
    RSS a process had when it was forked into its child's peak, so the command must not be forked from
    this (large) process."""
    done = subprocess.run([sys.executable, "-c", _TIMER, str(log), *cmd], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"timer failed: {done.stderr[-2000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r['rc']}):\n{log.read_text()[-3000:]}")
    rss = r["maxrss"] if sys.platform == "darwin" else r["maxrss"] * 1024
    return {"seconds": r["seconds"], "peak_rss_bytes": rss}


def _folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in folder.glob(pattern))


def compare_outputs(ours: Path, theirs: Path) -> dict:
    """Tensor-by-tensor comparison of the two tools' model*.safetensors (what mlx_lm.load reads)."""
    a, b = {}, {}
    for f in ours.glob("model*.safetensors"):
        a.update(mx.load(str(f)))
    for f in theirs.glob("model*.safetensors"):
        b.update(mx.load(str(f)))
    same = sum(1 for k in a if k in b and a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item())
    return {"tensors_ours": len(a), "tensors_mlx_lm": len(b), "identical": same, "names_match": set(a) == set(b)}


def bench_convert(a) -> int:
    shard_bytes = parse_size(a.shard_size)
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for variant in [v.strip() for v in a.variants.split(",") if v.strip()]:
            if variant not in ("bf16", "fp8"):
                raise ValueError(f"--variants: {variant!r} is not bf16 or fp8")
            src = work / f"src-{variant}"
            if src.exists():
                shutil.rmtree(src)
            tic = time.perf_counter()
            print(f"[bench convert] building the {variant} checkpoint in {src} ...", file=sys.stderr, flush=True)
            build_checkpoint(src, variant, a.layers, a.scale, shard_bytes)
            shards = sorted(src.glob("model-*.safetensors"))
            largest = max(f.stat().st_size for f in shards)
            print(f"[bench convert]   {_folder_bytes(src) / 1e9:.2f} GB in {len(shards)} shards "
                  f"({time.perf_counter() - tic:.0f} s)", file=sys.stderr, flush=True)
            outs = {"mlx-deepseek convert": work / f"ours-{variant}", "mlx_lm.convert": work / f"mlx-lm-{variant}"}
            cmds = {
                "mlx-deepseek convert": [
                    sys.executable, "-m", "mlx_deepseek.cli", "convert", str(src), "-o", str(outs["mlx-deepseek convert"]),
                    "--q-bits", str(a.bits), "--q-group-size", str(a.group_size), "--shard-size", a.shard_size, "--no-progress",
                ],
                "mlx_lm.convert": [
                    sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(outs["mlx_lm.convert"]),
                    "-q", "--q-bits", str(a.bits), "--q-group-size", str(a.group_size),
                ],
            }
            for tool, cmd in cmds.items():
                if outs[tool].exists():
                    shutil.rmtree(outs[tool])
                print(f"[bench convert]   {tool} ...", file=sys.stderr, flush=True)
                m = measure(cmd, work / f"{variant}-{tool.split()[0]}.log")
                rows.append({
                    "variant": variant, "tool": tool, "seconds": m["seconds"], "peak_rss_bytes": m["peak_rss_bytes"],
                    "input_bytes": _folder_bytes(src), "shards": len(shards), "largest_shard_bytes": largest,
                    "output_bytes": _folder_bytes(outs[tool]), "command": "python " + " ".join(cmd[1:]).replace(str(work), "$WORK"),
                })
            cmp = compare_outputs(outs["mlx-deepseek convert"], outs["mlx_lm.convert"])
            rows[-2]["compare"] = rows[-1]["compare"] = cmp
            for out in outs.values():
                shutil.rmtree(out)
            shutil.rmtree(src)
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    result = {"machine": machine(), "layers": a.layers, "scale": a.scale, "bits": a.bits, "group_size": a.group_size, "rows": rows}
    text = format_convert(result)
    print(json.dumps(result, indent=2) if a.json else text)
    if a.write:
        append_benchmarks(text, a)
    return 0


def machine() -> str:
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__} "
            f"({'GPU' if mx.default_device() == mx.gpu else 'CPU'} backend)")


def format_convert(r: dict) -> str:
    lines = [
        f"{r['machine']}; {r['bits']}-bit, group {r['group_size']}, {r['layers']} layers, width scale {r['scale']}",
        "",
        "| source | tool | wall s | peak RSS GB | RSS / largest input shard | output GB | identical tensors |",
        "|---|---|---|---|---|---|---|",
    ]
    by_variant: dict[str, dict] = {}
    for row in r["rows"]:
        by_variant.setdefault(row["variant"], {})[row["tool"]] = row
        c = row.get("compare", {})
        src = f"{row['variant']}: {row['input_bytes'] / 1e9:.2f} GB, {row['shards']} shards (largest {row['largest_shard_bytes'] / 1e9:.2f} GB)"
        lines.append(
            f"| {src} | {row['tool']} | {row['seconds']:.1f} | {row['peak_rss_bytes'] / 1e9:.2f} | "
            f"{row['peak_rss_bytes'] / row['largest_shard_bytes']:.2f}x | {row['output_bytes'] / 1e9:.3f} | "
            f"{c.get('identical', '-')}/{c.get('tensors_mlx_lm', '-')} |"
        )
    lines.append("")
    for variant, tools in by_variant.items():
        ours, theirs = tools.get("mlx-deepseek convert"), tools.get("mlx_lm.convert")
        if ours and theirs:
            lines.append(
                f"- {variant}: mlx-deepseek is {theirs['seconds'] / ours['seconds']:.2f}x the speed of mlx_lm.convert "
                f"and uses {ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f}x its peak RSS"
            )
    return "\n".join(lines)


def append_benchmarks(text: str, a) -> None:
    path = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
    args = f"--layers {a.layers} --scale {a.scale} --variants {a.variants} --shard-size {a.shard_size} --bits {a.bits} --group-size {a.group_size}"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    with open(path, "a") as f:
        f.write(f"\n### Run of {date}\n\n```bash\nmlx-deepseek bench convert {args} --write\n```\n\n{text}\n")
