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
    language consistency; on `speed_samples` of them MTP acceptance and speed-up over plain decoding, and
    each MoE layer's max/mean expert load over the generated tokens."""
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
    plain_tokens = plain_time = mtp_tokens = mtp_time = drafted = accepted = 0
    load = None
    if speed_samples:  # a first call compiles the decode graphs (seconds on a GPU): outside the timings
        for mtp in (False, True)[: 1 + bool(model.mtp)]:
            generate(model, tokenizer, prompts[0], max_tokens=max_tokens, mtp=mtp)
    for prompt in prompts[:speed_samples]:
        traced = generate(model, tokenizer, prompt, max_tokens=max_tokens, trace=True).expert_trace
        if traced is not None and traced.layers:
            load = traced.load if load is None else load + traced.load
        plain = generate(model, tokenizer, prompt, max_tokens=max_tokens)
        plain_tokens += plain.generation_tokens
        plain_time += plain.generation_tokens / max(plain.generation_tps, 1e-9)
        if model.mtp:
            spec = generate(model, tokenizer, prompt, max_tokens=max_tokens, mtp=True)
            mtp_tokens += spec.generation_tokens
            mtp_time += spec.generation_tokens / max(spec.generation_tps, 1e-9)
            drafted, accepted = drafted + spec.mtp_drafted, accepted + spec.mtp_accepted
    if speed_samples:
        out["decode_tps"] = plain_tokens / max(plain_time, 1e-9)
    if speed_samples and model.mtp:
        out["mtp_acceptance"] = accepted / max(drafted, 1)
        out["mtp_decode_tps"] = mtp_tokens / max(mtp_time, 1e-9)
        out["mtp_speedup"] = out["mtp_decode_tps"] / out["decode_tps"]
    if load is not None:
        ratio = load.max(axis=1) / np.maximum(load.mean(axis=1), 1e-9)
        out["expert_load_max_over_mean"] = [round(float(r), 3) for r in ratio]
    return out
