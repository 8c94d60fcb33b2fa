"""`evaluate`: how well a model does the synthetic reasoning tasks, and how MTP and the experts behave."""

from __future__ import annotations

import numpy as np

from .chat import render
from .generate import batch_generate, generate
from .train import tasks

TASKS = ("arithmetic",)


def evaluate(model, tokenizer, task: str = "arithmetic", split: str = "heldout", n: int = 200, batch_size: int = 50,
             max_tokens: int = 400, speed_samples: int = 10, seed: int = 12345) -> dict:
    """Greedy answers to `n` problems of `split`: accuracy, format (one think block, then a boxed answer),
    language consistency; on `speed_samples` of them MTP acceptance and speed-up over plain decoding (drafting
    with all MTP modules, and in `mtp_depths` with the first 1, 2, ... of them), and each MoE layer's max/mean
    expert load over the generated tokens."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {TASKS}")
    examples = list(tasks.generate(n, split=split, seed=seed))
    prompts = [render([{"role": "user", "content": ex.prompt}], "r1") for ex in examples]
    scores = []
    for i in range(0, n, batch_size):
        results = batch_generate(model, tokenizer, prompts[i : i + batch_size], max_tokens=max_tokens)
        scores += [tasks.score(ex, r.text) for ex, r in zip(examples[i : i + batch_size], results)]
    out = {
        "task": task, "split": split, "n": n,
        "accuracy": float(np.mean([s["correct"] for s in scores])),
        "format": float(np.mean([s["format"] for s in scores])),
        "language": float(np.mean([s["language"] for s in scores])),
    }
    depths = range(1, len(model.mtp) + 1)
    tokens, seconds = {d: 0 for d in (0, *depths)}, {d: 0.0 for d in (0, *depths)}  # depth 0: plain decoding
    drafted, accepted = {d: 0 for d in depths}, {d: 0 for d in depths}
    load = None
    if speed_samples:  # a first call compiles the decode graphs (seconds on a GPU): outside the timings
        for depth in (0, *depths):
            generate(model, tokenizer, prompts[0], max_tokens=max_tokens, mtp=depth)
    for prompt in prompts[:speed_samples]:
        traced = generate(model, tokenizer, prompt, max_tokens=max_tokens, trace=True).expert_trace
        if traced is not None and traced.layers:
            load = traced.load if load is None else load + traced.load
        for depth in (0, *depths):
            r = generate(model, tokenizer, prompt, max_tokens=max_tokens, mtp=depth)
            tokens[depth] += r.generation_tokens
            seconds[depth] += r.generation_tokens / max(r.generation_tps, 1e-9)
            if depth:
                drafted[depth], accepted[depth] = drafted[depth] + r.mtp_drafted, accepted[depth] + r.mtp_accepted
    if speed_samples:
        tps = {d: tokens[d] / max(seconds[d], 1e-9) for d in tokens}
        out["decode_tps"] = tps[0]
        if model.mtp:  # drafting with all modules, then with each depth
            deepest = depths[-1]
            out["mtp_acceptance"] = accepted[deepest] / max(drafted[deepest], 1)
            out["mtp_decode_tps"] = tps[deepest]
            out["mtp_speedup"] = tps[deepest] / tps[0]
            out["mtp_depths"] = [{"depth": d, "acceptance": accepted[d] / max(drafted[d], 1), "decode_tps": tps[d],
                                  "speedup": tps[d] / tps[0], "tokens_per_step": 1 + accepted[d] / max(drafted[d] / d, 1)}
                                 for d in depths]
    if load is not None:
        ratio = load.max(axis=1) / np.maximum(load.mean(axis=1), 1e-9)
        out["expert_load_max_over_mean"] = [round(float(r), 3) for r in ratio]
    return out
