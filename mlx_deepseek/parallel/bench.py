"""`mlx-deepseek bench distributed`: the same work on 1 rank and on N ranks (mlx.launch; ring on one
machine, or any backend / hostfile): decode and prefill tokens/s of expert-parallel and pipeline inference
on a random V2-Lite-shaped checkpoint (rank-local loading, bytes read per rank), and data-parallel
pretraining tokens/s of the nano-r1 architecture at one global batch.

The driver runs `python -m mlx_deepseek.parallel.bench OUT SETTINGS.json` on the ranks; each rank writes
OUT/rank{r}.json."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx


def _inference(checkpoint: str, mode: str, prompt_tokens: int, gen_tokens: int, trials: int) -> dict:
    from ..bench import _time_tokens
    from ..generate import generate_tokens
    from .loading import load_sharded

    tic = time.perf_counter()
    model = load_sharded(checkpoint, mode)
    load_s = time.perf_counter() - tic
    prompt = [3 + (i * 7919) % (model.args.vocab_size - 4) for i in range(prompt_tokens)]
    _time_tokens(generate_tokens(model, prompt, max_tokens=gen_tokens), 4)  # warm-up: compilation
    prefill, decode = 0.0, 0.0
    for _ in range(trials):
        first, rest = _time_tokens(generate_tokens(model, prompt, max_tokens=gen_tokens), gen_tokens)
        prefill, decode = max(prefill, prompt_tokens / first), max(decode, (gen_tokens - 1) / rest)
    return {"prefill_tps": prefill, "decode_tps": decode, "load_s": load_s, "bytes_read": model.shard.bytes_read,
            "bytes_total": model.shard.bytes_total, "peak_memory_gb": mx.get_peak_memory() / 1e9}


def _training(batch_size: int, seq_len: int, steps: int, group) -> dict:
    from ..loading import BUNDLED
    from ..models import Model
    from ..tokenizer import load_tokenizer
    from ..config import ModelArgs
    from ..train.loop import TrainConfig, Trainer, init_weights
    from ..train.pretrain import NANO_CONFIG
    from .data import shard_rows

    tok = load_tokenizer(BUNDLED)
    model = Model(ModelArgs.from_file(NANO_CONFIG))
    init_weights(model, 0)
    cfg = TrainConfig(steps=steps + 1, batch_size=batch_size, seq_len=seq_len, warmup=1, eval_every=0)
    trainer = Trainer(model, tok, cfg, tempfile.mkdtemp(), progress=False, group=group)
    batches = [next(trainer.data) for _ in range(steps + 1)]
    trainer.train_step(*shard_rows(batches[0], group))  # warm-up: compilation
    tic = time.perf_counter()
    for ids, mask in batches[1:]:
        r = trainer.train_step(*shard_rows((ids, mask), group))
    seconds = time.perf_counter() - tic
    return {"tokens_per_s": steps * batch_size * seq_len / seconds, "step_s": seconds / steps, "loss": r["loss"]}


def worker(out: Path, settings: dict) -> None:
    """One rank's measurements, written to out/rank{r}.json."""
    group = mx.distributed.init()
    result: dict = {"rank": group.rank(), "size": group.size(), "device": str(mx.default_device())}
    for mode in ("ep", "pp"):
        mx.reset_peak_memory()
        result[mode] = _inference(settings["checkpoint"], mode, settings["prompt_tokens"], settings["gen_tokens"],
                                  settings["trials"])
    result["dp"] = _training(settings["batch_size"], settings["seq_len"], settings["steps"], group)
    (out / f"rank{group.rank()}.json").write_text(json.dumps(result))


def bench_distributed(ranks: int = 2, hostfile: Optional[str] = None, backend: Optional[str] = None,
                      layers: int = 8, scale: float = 0.5, bits: Optional[int] = 4, prompt_tokens: int = 64,
                      gen_tokens: int = 64, trials: int = 3, batch_size: int = 8, seq_len: int = 128,
                      steps: int = 5, model: Optional[str] = None) -> dict:
    """1 rank (mlx.launch -n 1) against `ranks` local ranks or the hosts of `hostfile`, same settings."""
    from ..bench import random_checkpoint
    from .launch import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = model or str(random_checkpoint(tmp / "ckpt", layers=layers, scale=scale, bits=bits))
        settings = dict(checkpoint=checkpoint, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, trials=trials,
                        batch_size=batch_size, seq_len=seq_len, steps=steps)
        runs = {}
        for label, n, hosts in (("1 rank", 1, None), (f"{ranks} ranks" if hostfile is None else hostfile, ranks, hostfile)):
            out = tmp / f"out-{n}"
            out.mkdir()
            cmd = [sys.executable, "-m", "mlx_deepseek.parallel.bench", str(out), json.dumps(settings)]
            run_ranks(cmd, ranks=None if hosts else n, hostfile=hosts, backend=backend if n > 1 else None)
            runs[label] = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return {
        "model": model or f"random V2-Lite shape, {layers} layers, width x{scale}, " + (f"{bits}-bit" if bits else "unquantized"),
        "backend": backend or ("ring" if hostfile is None else "from hostfile"), "settings": settings, "runs": runs,
    }


def format_distributed(r: dict) -> str:
    s = r["settings"]
    lines = [
        f"model: {r['model']}; backend {r['backend']}; prompt {s['prompt_tokens']} tokens, {s['gen_tokens']} generated; "
        f"training: nano-r1 architecture, global batch {s['batch_size']} x {s['seq_len']} tokens",
        "",
        "| ranks | EP decode tok/s | EP prefill tok/s | PP decode tok/s | PP prefill tok/s | DP train tok/s | "
        "weights read per rank (EP / PP) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, ranks in r["runs"].items():
        r0 = ranks[0]
        read = " ; ".join(f"{x['ep']['bytes_read'] / 1e6:.1f} / {x['pp']['bytes_read'] / 1e6:.1f} MB" for x in ranks)
        lines.append(
            f"| {label} | {r0['ep']['decode_tps']:.1f} | {r0['ep']['prefill_tps']:.0f} | {r0['pp']['decode_tps']:.1f} | "
            f"{r0['pp']['prefill_tps']:.0f} | {r0['dp']['tokens_per_s']:.0f} | {read} (of {r0['ep']['bytes_total'] / 1e6:.1f} MB) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), json.loads(sys.argv[2]))
