"""`evaluate`: how well a model does the synthetic reasoning tasks, and how MTP and the experts behave."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .chat import render
from .generate import Sampling, batch_generate, generate
from .train import tasks

TASKS = ("arithmetic",)


def evaluate(model, tokenizer, task: str = "arithmetic", split: str = "heldout", n: int = 200, batch_size: int = 50,
             max_tokens: int = 400, speed_samples: int = 10, seed: int = 12345, samples: int = 0,
             temperature: float = 1.0) -> dict:
    """Greedy answers to `n` problems of `split`: accuracy (also per kind and level, `by_kind`), format (one
    think block, then a boxed answer), language consistency; with `samples` k, also k answers per problem
    sampled at `temperature`: `sampled_accuracy` (pass@1 averaged over the k) and `pass_at_k`; on
    `speed_samples` of them MTP acceptance and speed-up over plain decoding (drafting with all MTP modules,
    and in `mtp_depths` with the first 1, 2, ... of them), and each MoE layer's max/mean expert load over the
    generated tokens."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {TASKS}")
    examples = list(tasks.generate(n, split=split, seed=seed))
    prompts = [render([{"role": "user", "content": ex.prompt}], "r1") for ex in examples]
    scores = _scores(model, tokenizer, examples, prompts, batch_size, max_tokens)
    out = {
        "task": task, "split": split, "n": n,
        "accuracy": float(np.mean([s["correct"] for s in scores])),
        "format": float(np.mean([s["format"] for s in scores])),
        "language": float(np.mean([s["language"] for s in scores])),
        "by_kind": _by_kind(examples, [[s] for s in scores]),
    }
    if samples:
        sampling = Sampling(temperature=temperature, seed=seed)
        sampled = _scores(model, tokenizer, examples, prompts, batch_size, max_tokens, samples, sampling)
        out.update(samples=samples, temperature=temperature,
                   sampled_accuracy=float(np.mean([s["correct"] for row in sampled for s in row])),
                   pass_at_k=float(np.mean([any(s["correct"] for s in row) for row in sampled])),
                   sampled_by_kind=_by_kind(examples, sampled))
    depths = range(1, len(model.mtp) + 1)
    tokens, seconds = {d: 0 for d in (0, *depths)}, {d: 0.0 for d in (0, *depths)}  # depth 0: plain decoding
    drafted, accepted = {d: 0 for d in depths}, {d: 0 for d in depths}
    load = None
    for prompt in prompts[:speed_samples]:
        traced = generate(model, tokenizer, prompt, max_tokens=max_tokens, trace=True).expert_trace
        if traced is not None and traced.layers:
            load = traced.load if load is None else load + traced.load
    # each depth over all the prompts in turn, as a user decodes (switching on every prompt costs a GPU backend
    # its cached kernel graphs); a first call compiles the decode graphs (seconds on a GPU): outside the timings
    for depth in (0, *depths) if speed_samples else ():
        generate(model, tokenizer, prompts[0], max_tokens=max_tokens, mtp=depth)
        for prompt in prompts[:speed_samples]:
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


def _scores(model, tokenizer, examples, prompts, batch_size: int, max_tokens: int, samples: int = 0,
            sampling: Optional[Sampling] = None) -> list:
    """tasks.score of each problem's greedy answer, or (samples k > 0) a list of its k sampled answers' scores;
    batches of about batch_size rows (k rows per problem)."""
    k = max(samples, 1)  # answers per problem
    per_batch = max(1, batch_size // k)
    out = []
    for i in range(0, len(prompts), per_batch):
        chunk = examples[i : i + per_batch]
        results = batch_generate(model, tokenizer, prompts[i : i + per_batch], n=k, max_tokens=max_tokens,
                                 sampling=sampling)
        rows = [tasks.score(chunk[j // k], r.text) for j, r in enumerate(results)]
        out += rows if not samples else [rows[j : j + k] for j in range(0, len(rows), k)]
    return out


def _by_kind(examples, scores) -> dict:
    """Share right per kind and level ('add5': 0.25), over each problem's answers."""
    right: dict = {}
    for ex, row in zip(examples, scores):
        right.setdefault(f"{ex.problem.kind}{ex.problem.level}", []).extend(s["correct"] for s in row)
    return {key: round(float(np.mean(v)), 4) for key, v in sorted(right.items())}
