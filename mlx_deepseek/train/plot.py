"""Training curves (loss, MTP loss, expert load) from one or more runs' metrics.jsonl, as a PNG.

Needs matplotlib, which only this plot uses: `pip install matplotlib`.
"""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install matplotlib") from None
    return plt


def plot_runs(runs: list[tuple[str, Path]], out: Path) -> Path:
    """runs: (label, metrics.jsonl) in training order; steps of later runs continue the x axis."""
    plt = _pyplot()
    fig, (loss_ax, load_ax) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for label, path in runs:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        steps = [offset + r["step"] for r in rows]
        loss_ax.plot(steps, [r["ce"] for r in rows], label=f"{label}: next-token CE")
        loss_ax.plot(steps, [r["mtp_ce"] for r in rows], "--", label=f"{label}: MTP CE")
        load_ax.plot(steps, [r["load_max_mean_worst"] for r in rows], label=label)
        offset = steps[-1] if steps else offset
    loss_ax.set(xlabel="step", ylabel="cross-entropy (nats)", yscale="log", title="loss")
    load_ax.set(xlabel="step", ylabel="max / mean expert load (worst layer)", title="expert balance")
    load_ax.axhline(2.0, color="grey", lw=0.8, ls=":")
    return _save(fig, (loss_ax, load_ax), out)


def _save(fig, axes, out: Path) -> Path:
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return Path(out)


def plot_grpo(runs: list[tuple[str, Path]], out: Path) -> Path:
    """GRPO curves of runs (label, metrics.jsonl): training reward and per-function rewards, rollout accuracy,
    and the held-out evaluation (accuracy, format) against the step."""
    plt = _pyplot()
    fig, (reward_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, path in runs:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        train = [r for r in rows if "reward" in r]
        steps = [r["step"] for r in train]
        reward_ax.plot(steps, [r["reward"] for r in train], lw=0.8, label=f"{label}: reward (weighted)")
        for key in sorted({k for r in train for k in r if k.startswith("rewards/")}):
            reward_ax.plot(steps, [r.get(key) for r in train], lw=0.6, alpha=0.7, label=f"{label}: {key[8:]}")
        evals = [r for r in rows if "eval_accuracy" in r]
        eval_ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label=f"{label}: accuracy")
        eval_ax.plot([r["step"] for r in evals], [r["eval_format"] for r in evals], "s--", label=f"{label}: format")
    reward_ax.set(xlabel="step", ylabel="mean over the step's rollouts", title="training rewards")
    eval_ax.set(xlabel="step", ylabel="share of held-out problems (greedy)", title="held-out evaluation", ylim=(0, 1))
    return _save(fig, (reward_ax, eval_ax), out)
