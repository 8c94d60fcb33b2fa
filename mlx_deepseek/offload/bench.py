"""`mlx-deepseek bench offload`: decode speed and hit rates of expert offloading at several residencies,
against the all-resident model and a naive loader; pread vs mmap and the disk's read bandwidth; a trace-replay
hit-rate table (LRU, LFU, Belady's optimum) across cache sizes."""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from ..bench import _time_tokens, random_checkpoint
from ..config import ModelArgs
from ..generate import PromptCache, Sampling, generate_tokens
from ..loading import load_model
from ..models.moe import DeepSeekMoE, RoutingTrace
from ..weights import mtp_files, save_model, weight_files
from .policies import replay_table
from .source import ExpertReader, expert_layout

RESIDENCIES = (1.0, 0.5, 0.25, 0.125)


def balance_routers(model, batch: int = 16, tokens: int = 128, steps: int = 30, gamma: float = 0.02, seed: int = 0) -> None:
    """Random routers send most tokens to a few experts (their inputs share a large common part and vary in
    few directions), which flatters any cache. Give each MoE layer, in order, a router that reads the
    whitened variation of its own inputs on random tokens (e_i = W r_i, W = Cov(x)^-1/2, r_i random and
    orthogonal to W mean(x)): its logits are then close to independent N(0, 1) per token and expert; V3's
    aux-loss-free bias (b_i += gamma * sign(mean load - load_i), gamma decaying) evens out the rest. Routing is
    then balanced, with no locality beyond what random text gives (a trained router has more)."""
    rng = np.random.default_rng(seed)
    ids = mx.array(rng.integers(3, model.args.vocab_size - 1, (batch, tokens)))  # decode-like positions
    moes = sorted((m for _, m in model.named_modules() if isinstance(m, DeepSeekMoE)), key=lambda m: m.layer)
    trace = _InputTrace()
    for moe in moes:
        if moe.layer >= model.args.num_hidden_layers:
            continue  # MTP modules: not on the main model's path
        model.set_routing_trace(trace)
        try:
            model.model(ids)
        finally:
            model.set_routing_trace(None)
        x = np.array(trace.inputs[moe.layer].astype(mx.float32)).reshape(-1, model.args.hidden_size).astype(np.float64)
        mean = x.mean(axis=0)
        values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
        white = vectors @ np.diag(1 / np.sqrt(np.maximum(values, values.max() * 0.05))) @ vectors.T
        r = rng.normal(size=(model.args.n_routed_experts, len(mean)))
        u = white @ mean
        r -= np.outer(r @ u, u) / (u @ u)  # no token-independent part in the logits
        r /= np.linalg.norm(r, axis=1, keepdims=True)
        moe.gate.weight = mx.array(r @ white, moe.gate.weight.dtype)
        if "e_score_correction_bias" in moe.gate:  # then V3's aux-loss-free bias evens out what is left
            moe.gate.e_score_correction_bias = mx.zeros_like(moe.gate.e_score_correction_bias)
            for step in range(steps):
                inds, _ = moe.gate(trace.inputs[moe.layer])
                load = np.bincount(np.array(inds).reshape(-1), minlength=model.args.n_routed_experts)
                change = gamma * 0.9**step * np.sign(load.mean() - load)
                moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias + mx.array(change, mx.float32)
        mx.eval(model.parameters())


class _InputTrace(RoutingTrace):
    """A RoutingTrace that keeps each layer's router input."""

    def __init__(self):
        super().__init__()
        self.inputs = {}

    def record(self, moe, x, inds, weights):
        super().record(moe, x, inds, weights)
        self.inputs[moe.layer] = x


def bench_checkpoint(folder: Path, layers: int, scale: float, bits: Optional[int]) -> Path:
    """A random V2-Lite-shaped checkpoint (bench generate's builder) with balanced routers."""
    random_checkpoint(folder, layers=layers, scale=scale, bits=bits)
    model = load_model(folder)
    balance_routers(model)
    config = json.loads((folder / "config.json").read_text())
    for f in list(folder.glob("*.safetensors")):
        f.unlink()
    save_model(model, folder, config)
    return folder


def drop_from_page_cache(folder: Path) -> bool:
    """Evict a checkpoint's files from the OS page cache (posix_fadvise DONTNEED after fsync); False where
    the OS has no such call (then 'cold' numbers are not cold)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in list(weight_files(folder)) + mtp_files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def disk_bandwidth(folder: Path) -> dict:
    """Cold read bandwidth of the checkpoint's files: sequential (8 MiB reads) and expert-sized reads at
    random offsets (what misses do), each right after dropping the files from the page cache."""
    files = list(weight_files(folder)) + mtp_files(folder)
    out = {"method": "posix_fadvise(DONTNEED) on the checkpoint files, then os.pread"}
    drop_from_page_cache(folder)
    buf, total, tic = bytearray(8 << 20), 0, time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while (n := os.preadv(fd, [buf], offset)) > 0:
                offset += n
                total += n
        finally:
            os.close(fd)
    out["sequential_gbs"] = total / (time.perf_counter() - tic) / 1e9
    return out


def reader_bandwidth(folder: Path, args: ModelArgs) -> dict:
    """GB/s of reading every expert of every layer into one slot-sized buffer, pread vs mmap, from the page
    cache (warm) and right after dropping the files from it (cold; expert-sized reads in shuffled order)."""
    layout = expert_layout(folder, args)
    spans = [s for params in layout.layers.values() for ss in params.values() for s in ss]
    random.Random(0).shuffle(spans)
    buf = memoryview(bytearray(max(s.nbytes for s in spans)))
    out = {}
    for method in ExpertReader.METHODS:
        for state in ("cold", "warm"):
            if state == "cold":
                drop_from_page_cache(folder)
            reader = ExpertReader(method)
            tic = time.perf_counter()
            for s in spans:
                reader.read_raw(s, buf[: s.nbytes])
            out[f"{method}_{state}_gbs"] = sum(s.nbytes for s in spans) / (time.perf_counter() - tic) / 1e9
            reader.close()
    return out


def _decode(model, prompt: list[int], gen_tokens: int, trials: int, uncompiled: bool = False, before=None) -> float:
    """Best decode tokens/s over `trials` (sampled at temperature 1 with a fixed seed: every configuration
    decodes the same tokens, since offloading is exact)."""
    best = 0.0
    for _ in range(trials):
        if before:
            before()
        pc = PromptCache(model)
        pc.offloaded = pc.offloaded or uncompiled
        steps = generate_tokens(model, prompt, gen_tokens + 1, Sampling(temperature=1.0, seed=0), prompt_cache=pc)
        mx.random.seed(0)
        _, rest = _time_tokens(steps, gen_tokens)
        best = max(best, (gen_tokens - 1) / rest)
    return best


def bench_offload(model_path: Optional[str] = None, layers: int = 4, scale: float = 0.5, bits: Optional[int] = 4,
                  prompt_tokens: int = 32, gen_tokens: int = 48, trials: int = 2,
                  residencies=RESIDENCIES, trace_tokens: int = 128, nano_prompts: int = 4) -> dict:
    """Decode tokens/s, hit rate, bytes read and stalls of offloaded decoding at each residency (LRU, pread,
    warm page cache), against all-resident (compiled, and uncompiled) and a naive loader (no cache: every
    selected expert read every token); 25% also cold, with mmap, LFU and prefetch. Plus reader and disk
    bandwidths and trace-replay hit rates."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(model_path) if model_path else bench_checkpoint(Path(tmp) / "bench", layers, scale, bits)
        args = ModelArgs.from_file(folder)
        rng = np.random.default_rng(0)
        prompt = rng.integers(3, args.vocab_size - 1, prompt_tokens).tolist()
        rows = {}

        resident = load_model(folder)
        _decode(resident, prompt, 8, 1)  # warm-up: compilation
        base = _decode(resident, prompt, gen_tokens, trials)
        rows["all-resident (compiled)"] = {"decode_tps": base}
        rows["all-resident, uncompiled"] = {"decode_tps": _decode(resident, prompt, gen_tokens, trials, uncompiled=True)}
        trace = _trace(resident, prompt, trace_tokens)
        del resident

        def offloaded(name, memory, options=None, naive=False, cold=False):
            model = load_model(folder, expert_memory=memory, offload=options)
            off = model.offloader
            off.set_naive(naive)
            _decode(model, prompt, 8, 1)  # warm-up: the bank fills
            off.reset_stats()
            tps = _decode(model, prompt, gen_tokens, trials, before=(lambda: drop_from_page_cache(folder)) if cold else None)
            st = off.stats()["decode"]
            rows[name] = {
                "decode_tps": tps, "residency": off.bank_bytes / off.total, "hit_rate": st["hit_rate"],
                "mb_read_per_token": st["bytes_read_per_token"] / 1e6,
                "stall_ms_per_token": 1e3 * st["stall_s"] / max(st["tokens"], 1),
            }
            off.close()

        for r in residencies:
            offloaded(f"offloaded {r:.1%}", f"{100 * r}%")
        offloaded("naive loader (no cache)", f"{100 * min(residencies)}%", naive=True)
        offloaded("offloaded 25%, cold (page cache dropped)", "25%", cold=True)
        offloaded("offloaded 25%, mmap", "25%", {"reader": "mmap"})
        offloaded("offloaded 25%, LFU", "25%", {"policy": "lfu"})
        offloaded("offloaded 25%, prefetch", "25%", {"prefetch": True})
        for row in rows.values():
            row["vs_resident"] = row["decode_tps"] / base

        layout = expert_layout(folder, args)
        fractions = (0.125, 0.25, 0.5, 1.0)
        replay = {
            "bench checkpoint (balanced random routers, sampled tokens)": replay_table(
                trace, args.n_routed_experts, fractions, args.num_experts_per_tok),
        }
        nano = _nano_trace(nano_prompts)
        if nano is not None:
            replay["nano-r1 (trained; greedy answers to arithmetic prompts)"] = replay_table(
                nano[0], nano[1], fractions, nano[2])
        return {
            "model": model_path or f"random V2-Lite shape, {layers} layers, width x{scale}, "
            + (f"{bits}-bit" if bits else "unquantized") + ", routers balanced",
            "device": str(mx.default_device()), "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
            "expert_bytes": layout.total_bytes, "expert_mb": layout.expert_bytes(next(iter(layout.layers))) / 1e6,
            "disk": disk_bandwidth(folder), "readers": reader_bandwidth(folder, args),
            "results": rows, "replay": replay,
        }


def _trace(model, prompt: list[int], tokens: int) -> list[np.ndarray]:
    """Per decoded token [n_moe_layers, k]: the experts the model chose (sampled decoding, as the bench)."""
    trace = RoutingTrace()
    model.set_routing_trace(trace)
    try:
        pc = PromptCache(model)
        pc.traced = True
        for _ in generate_tokens(model, prompt, tokens, Sampling(temperature=1.0, seed=0), prompt_cache=pc):
            pass
    finally:
        model.set_routing_trace(None)
    main = [(layer, np.array(i)) for layer, i, _ in trace.records if layer < model.args.num_hidden_layers]
    layers = sorted({layer for layer, _ in main})
    decode = [i for _, i in main[len(layers):]]  # after the prefill pass: one record per layer per token
    steps = [np.stack([decode[s * len(layers) + j][0, 0] for j in range(len(layers))])
             for s in range(len(decode) // len(layers))]
    return steps


def _nano_trace(prompts: int):
    """The bundled nano-r1's expert trace over greedy answers to a few of its task prompts (None if absent)."""
    try:
        from ..chat import apply_chat_template
        from ..generate import generate
        from ..loading import load

        model, tok = load(None)
    except FileNotFoundError:
        return None
    experts = []
    for a, b in [(347, 285), (12, 30), (908, 77), (45, 56), (123, 456), (81, 19)][:prompts]:
        text = apply_chat_template(tok, [{"role": "user", "content": f"What is {a} + {b}?"}], model.args.model_type)
        experts += generate(model, tok, text, max_tokens=256, trace=True).expert_trace.experts
    return experts, model.args.n_routed_experts, model.args.num_experts_per_tok


def format_offload(r: dict) -> str:
    d, rd = r["disk"], r["readers"]
    lines = [
        f"model: {r['model']}; device: {r['device']}; routed experts {r['expert_bytes'] / 1e9:.2f} GB "
        f"({r['expert_mb']:.2f} MB each); prompt {r['prompt_tokens']}, {r['gen_tokens']} decoded (temperature 1, seed 0)",
        f"disk (cold, {d['method']}): sequential {d['sequential_gbs']:.2f} GB/s",
        "expert reads, shuffled: " + ", ".join(f"{k[:-4].replace('_', ' ')} {v:.2f} GB/s" for k, v in rd.items()),
        "",
        "| configuration | residency | decode tok/s | vs all-resident | hit rate | MB read/token | stall ms/token |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in r["results"].items():
        res = f"{row['residency']:.1%}" if "residency" in row else "100%"
        hit = f"{row['hit_rate']:.1%}" if row.get("hit_rate") is not None else "-"
        mb = f"{row['mb_read_per_token']:.2f}" if "mb_read_per_token" in row else "-"
        stall = f"{row['stall_ms_per_token']:.1f}" if "stall_ms_per_token" in row else "-"
        lines.append(f"| {name} | {res} | {row['decode_tps']:.2f} | {row['vs_resident']:.2f}x | {hit} | {mb} | {stall} |")
    for name, table in r["replay"].items():
        lines += ["", f"trace replay, {name}: mean hit rate over MoE layers", "",
                  "| cache | slots | LRU | LFU (decay 0.9) | Belady (optimum) |", "|---|---|---|---|---|"]
        for row in table:
            lines.append(f"| {row['fraction']:.1%} | {row['slots']} | {row['lru']:.1%} | {row['lfu']:.1%} | {row['belady']:.1%} |")
    return "\n".join(lines)
