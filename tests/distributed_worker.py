"""Run by every rank of the distributed tests (see test_distributed.py): `python distributed_worker.py OUT
JOB...`, each JOB `logits:MODE:FOLDER` (EP/PP forward pass and greedy decode of a checkpoint),
`cli:MODE:FOLDER` (the generate command) or `dp:TOKENIZER:BATCH.npz` (one data-parallel training step). Rank r writes OUT/rank{r}.npz."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_deepseek.parallel import load_sharded

PROMPT = [[1, 5, 6, 7, 8, 9, 10, 11], [3, 4, 5, 6, 100, 101, 102, 103]]


def bytes_read() -> int:
    """rchar of /proc/self/io: bytes this process read through read() calls (page cache included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return -1


def logits_job(mode: str, folder: str, out: dict, key: str) -> None:
    from mlx_deepseek.generate import generate_tokens

    before = bytes_read()
    model = load_sharded(folder, mode, dtype="float32" if "q4" not in folder else None)
    out[f"{key}/rchar"] = bytes_read() - before
    out[f"{key}/bytes_read"] = model.shard.bytes_read
    out[f"{key}/bytes_total"] = model.shard.bytes_total
    out[f"{key}/logits"] = np.array(model(mx.array(PROMPT)).astype(mx.float32))
    out[f"{key}/tokens"] = np.array([t for new in generate_tokens(model, PROMPT[0], max_tokens=10) for t in new])


def dp_job(tokenizer: str, batch: str, out: dict, group) -> None:
    from mlx.utils import tree_flatten

    from mlx_deepseek.config import ModelArgs
    from mlx_deepseek.models import Model
    from mlx_deepseek.parallel import shard_rows
    from mlx_deepseek.tokenizer import load_tokenizer
    from mlx_deepseek.train.loop import TrainConfig, Trainer, init_weights

    data = np.load(batch)
    cfg = json.loads(str(data["config"]))
    model = Model(ModelArgs.from_dict(cfg["model"]))
    init_weights(model, 0)
    trainer = Trainer(model, load_tokenizer(tokenizer), TrainConfig(**cfg["train"]), "/tmp/unused", progress=False,
                      group=group)
    ids, mask = shard_rows((data["ids"], data["mask"]), group)
    r = trainer.train_step(ids, mask)
    out["dp/loss"] = r["loss"]
    out["dp/ce"] = r["ce"]
    out["dp/grad_norm"] = r["grad_norm"]
    for k, v in tree_flatten(model.parameters()):
        out[f"dp/param/{k}"] = np.array(v)


def cli_job(mode: str, folder: str, out: dict) -> None:
    """`mlx-deepseek generate --parallel MODE --json` inside the ranks: rank 0's stdout."""
    import contextlib
    import io

    from mlx_deepseek.cli import main as cli

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        cli(["generate", "--model", folder, "--prompt", "w5 w6 w7 w8", "--raw", "--max-tokens", "8",
             "--dtype", "float32", "--parallel", mode, "--json"])
    out[f"cli:{mode}"] = text.getvalue()


def main() -> None:
    group = mx.distributed.init(strict=True)
    out_dir, jobs = Path(sys.argv[1]), sys.argv[2:]
    from mlx_deepseek.parallel import common_seed

    out: dict = {"size": group.size(), "seed": common_seed(None, group)}
    for job in jobs:
        kind, a, b = job.split(":", 2)
        if kind == "logits":
            logits_job(a, b, out, f"{a}:{b}")
        elif kind == "cli":
            cli_job(a, b, out)
        else:
            dp_job(a, b, out, group)
    np.savez(out_dir / f"rank{group.rank()}.npz", **out)


if __name__ == "__main__":
    main()
