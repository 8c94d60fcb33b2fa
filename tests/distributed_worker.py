"""Run by every rank of the distributed tests (see test_distributed.py): `python distributed_worker.py OUT
JOB...`, each JOB `logits:MODE:FOLDER` (EP/PP forward pass and greedy decode of a checkpoint),
`cli:MODE:FOLDER` (the generate command), `dp:TOKENIZER:BATCH.npz` (one data-parallel training step) or
`grpo:FOLDER:RUNS` (data-parallel GRPO: one step per case on fixed rollouts, then runs with real rollouts in RUNS).
Rank r writes OUT/rank{r}.npz."""

import json
import sys
import zlib
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


# ---- data-parallel GRPO (test_distributed.py computes the single-process side with the same functions) ----
# lr 1e-3: Adam turns float noise in near-zero gradients (LoRA A at the second update, whose gradient is
# proportional to B) into parameter noise of ~1e-3 lr; at 1e-2 that reaches 1.2e-5 with mu = 2
GRPO_RUN = dict(prompts_per_step=4, group_size=3, max_completion_tokens=6, lr=1e-3, save_every=1, log_every=1,
                task_options={"levels": (1, 1)})
GRPO_CASES = {  # loss types with the reference log-probs (beta); dapo also with the batch std and mu = 2
    "grpo": dict(loss_type="grpo", beta=0.04),
    "dapo": dict(loss_type="dapo", beta=0.04, scale_rewards="batch", mu=2),
}


def fixed_rollout(model, tokenizer, rows, cfg, reward_set):
    """Stands in for grpo.rollout: each prompt's group (prompt ids, completions of 1-6 tokens, rewards) is a
    function of the prompt text alone, so a rank and one process roll out the same groups for the same prompts."""
    from mlx_deepseek.train.grpo import Group

    groups = []
    for row in rows:
        rng = np.random.default_rng(zlib.crc32(row["prompt"].encode()))
        G = cfg.group_size
        groups.append(Group(
            row=row, prompt_ids=rng.integers(3, 500, int(rng.integers(3, 8))).tolist(),
            completions=[rng.integers(3, 500, int(rng.integers(1, 7))).tolist() for _ in range(G)],
            texts=[""] * G, truncated=[False] * G, rewards=rng.random((G, len(reward_set.names))),
        ))
    return groups, {"gen_tokens": sum(len(c) for g in groups for c in g.completions), "gen_seconds": 1e-3}


def grpo_step(folder: str, case: str, group):
    """One GRPO step of GRPO_CASES[case] on fixed rollouts: (the averaged gradients of each update, flat, keys
    prefixed with the update's index; the step's metrics; the parameters after), each rank rolling out its share of
    the prompts (group None: all of them)."""
    from mlx.utils import tree_flatten

    from mlx_deepseek.train import grpo as G
    from mlx_deepseek.train.loop import load_for_training

    model, tok, _ = load_for_training(folder)
    tr = G.GRPOTrainer(model, tok, G.GRPOConfig(**GRPO_RUN, **GRPO_CASES[case]), "/tmp/unused", progress=False,
                       group=group)
    grads, compute, real = [], tr.compute_grads, G.rollout
    tr.compute_grads = lambda batch: grads.append(compute(batch)) or grads[-1]
    G.rollout = fixed_rollout
    try:
        row = tr.train_step()
    finally:
        G.rollout = real
    params = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    return {f"{i}/{k}": np.array(v) for i, (g, _) in enumerate(grads) for k, v in tree_flatten(g)}, row, params


def filter_steps(folder: str, group, steps: int = 3):
    """Three GRPO steps with the difficulty filter on fixed rollouts in which addition and multiplication groups all
    score alike (their buckets settle): (each rollout call's prompts, the filter's state, the stream position, the
    prompts skipped per step)."""
    from mlx_deepseek.train import grpo as G
    from mlx_deepseek.train.loop import load_for_training

    model, tok, _ = load_for_training(folder)
    cfg = G.GRPOConfig(**GRPO_RUN, loss_type="grpo", skip_settled=2, resample_zero_std=1)
    tr = G.GRPOTrainer(model, tok, cfg, "/tmp/unused", progress=False, group=group)
    seen, real = [], G.rollout

    def settling(model, tokenizer, rows, cfg, reward_set):
        seen.append([r["prompt"] for r in rows])
        groups, info = fixed_rollout(model, tokenizer, rows, cfg, reward_set)
        for g in groups:
            if g.row["kind"] in ("add", "mul"):
                g.rewards = np.ones_like(g.rewards)
        return groups, info

    G.rollout = settling
    try:
        skipped = [tr.train_step()["skipped"] for _ in range(steps)]
    finally:
        G.rollout = real
    return seen, tr.filter.state(), tr.data.position, skipped


def grpo_job(folder: str, runs: str, out: dict, group) -> None:
    """The fixed-rollout steps, then real rollouts: run a (2 steps) and run b (1 step, then resumed to 2)."""
    from mlx_deepseek.parallel import global_sum
    from mlx_deepseek.train import grpo as G

    for case in GRPO_CASES:
        grads, row, params = grpo_step(folder, case, group)
        out[f"grpo:{case}/row"] = json.dumps({k: v for k, v in row.items() if isinstance(v, (int, float))})
        out.update({f"grpo:{case}/grad/{k}": v for k, v in grads.items()})
        out.update({f"grpo:{case}/param/{k}": v for k, v in params.items()})
    seen, state, position, skipped = filter_steps(folder, group)
    out["grpo/filter"] = json.dumps({"seen": seen, "state": state, "position": position, "skipped": skipped})
    seen, real = [], G.rollout

    def recording(model, tok, rows, cfg, reward_set):
        groups, info = real(model, tok, rows, cfg, reward_set)
        seen.append([(g.row["prompt"], g.completions) for g in groups])
        return groups, info

    G.rollout = recording
    cfg = dict(GRPO_RUN, steps=2, beta=0.04, max_completion_tokens=4)
    G.grpo(folder, Path(runs) / "a", G.GRPOConfig(**cfg), progress=False)
    G.grpo(folder, Path(runs) / "b", G.GRPOConfig(**{**cfg, "steps": 1}), progress=False)
    mx.eval(global_sum(mx.array(0.0), group))  # rank 0 has written run b's checkpoint
    G.grpo(folder, Path(runs) / "b", G.GRPOConfig(**cfg), resume=True, progress=False)
    G.rollout = real
    out["grpo/rollouts"] = json.dumps(seen)


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
        elif kind == "grpo":
            grpo_job(a, b, out, group)
        else:
            dp_job(a, b, out, group)
    np.savez(out_dir / f"rank{group.rank()}.npz", **out)


if __name__ == "__main__":
    main()
