"""Decode speed as the chat app and `eval` see it: `stream_generate` on the task's held-out prompts, per MTP depth,
with the gap between streamed chunks (one chunk per decode step: 1 token plain, 1 + accepted with MTP).

    python benchmarks/stream_timing.py --model runs/mtp3 [--prompts 6] [--rounds 3] [--alternating]

Each depth runs over all the prompts in turn (`alone`, as a user decodes); `--rounds R` repeats that R times (every
depth once per round) and ends with each depth's median tok/s and median ratio to plain decoding over the rounds,
so that a slow spell of the host lands on one round of every depth rather than on one depth. `--alternating` also
runs every depth on each prompt before the next prompt (how `eval` timed MTP until session 7), which on a GPU
backend evicts the other modes' cached kernel graphs between generations.
"""

import argparse
import statistics
import time

from mlx_deepseek import load
from mlx_deepseek.chat import render
from mlx_deepseek.generate import stream_generate
from mlx_deepseek.train import tasks


def gaps_of(model, tokenizer, prompt: str, depth: int) -> tuple[list[float], object]:
    stamps = []
    for chunk in stream_generate(model, tokenizer, prompt, max_tokens=400, mtp=depth):
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])], chunk.result


def report(model, tokenizer, prompts: list[str], label: str, order: list[int]) -> dict:
    """Prints and returns each depth's tok/s over the prompts."""
    runs: dict = {}
    for prompt in prompts:
        for depth in order:
            gaps, result = gaps_of(model, tokenizer, prompt, depth)
            r = runs.setdefault(depth, {"tokens": 0, "seconds": 0.0, "steady": [], "first": []})
            r["tokens"] += result.generation_tokens
            r["seconds"] += result.generation_tokens / result.generation_tps
            r["steady"] += gaps[1:-2]  # the first gap starts the pipeline; the last two hold the stop
            r["first"].append(gaps[0] * 1e3)
    for depth, r in sorted(runs.items()):
        print(f"{label:11s} depth {depth}: {r['tokens'] / r['seconds']:7.1f} tok/s, median step gap "
              f"{statistics.median(r['steady']) * 1e3:.3f} ms, first gap {statistics.mean(r['first']):.1f} ms")
    return {depth: r["tokens"] / r["seconds"] for depth, r in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--alternating", action="store_true")
    a = p.parse_args()
    model, tokenizer = load(a.model)
    examples = list(tasks.generate(a.prompts + 1, split="heldout", seed=12345))
    prompts = [render([{"role": "user", "content": e.prompt}], "r1") for e in examples]
    depths = list(range(len(model.mtp) + 1))
    for depth in depths:  # compile every depth's decode graphs outside the timings
        gaps_of(model, tokenizer, prompts[0], depth)
    if a.alternating:
        report(model, tokenizer, prompts[1:], "alternating", depths)
    rounds = []
    for r in range(a.rounds):
        tps: dict = {}
        for depth in depths:
            tps.update(report(model, tokenizer, prompts[1:], f"alone r{r + 1}" if a.rounds > 1 else "alone", [depth]))
        rounds.append(tps)
    if a.rounds > 1:
        for depth in depths:
            speed = statistics.median(t[depth] for t in rounds)
            ratio = statistics.median(t[depth] / t[0] for t in rounds)
            print(f"median of {a.rounds} rounds, depth {depth}: {speed:7.1f} tok/s, {ratio:.2f}x plain")


if __name__ == "__main__":
    main()
