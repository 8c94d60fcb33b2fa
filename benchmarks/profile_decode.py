"""Where a decode step's time goes: the compiled plain step, the main model's forward pass on 1 .. D+1 tokens, the
compiled speculative (MTP) step at each depth, and the whole token loop at each depth, all on one model.

    python benchmarks/profile_decode.py --model runs/mtp2 [--steps 200] [--context 300]

The prompt is a short arithmetic question when the folder has a tokenizer, else 18 fixed token ids (a checkpoint
made by `bench generate`'s `random_checkpoint` has none).

Steps are chained the way decoding chains them (each queued with async_eval, read only at the end), and the cache
offsets are moved back after each step, so every timed step sees the same context; the host time of one call (its
graph built, never evaluated) is timed too. On a GPU a step is host-bound:
the times are per-operation overhead, which is what MTP's extra tokens per step must beat.
"""

import argparse
import time
from pathlib import Path

import mlx.core as mx

from mlx_deepseek import load
from mlx_deepseek.loading import load_model
from mlx_deepseek.generate import PromptCache, _sampler, compiled_steps, generate_tokens
from mlx_deepseek.models.cache import StaticKVCache

GREEDY = _sampler(0.0, 1.0, 0.0, 0)


def per_call_ms(fn, steps: int) -> float:
    """Milliseconds per call of fn (which returns arrays), queued back to back after a warm-up."""
    for _ in range(5):
        out = fn()
    mx.eval(out)
    tic = time.perf_counter()
    for _ in range(steps):
        out = fn()
        mx.async_eval(out)
    mx.eval(out)
    return (time.perf_counter() - tic) / steps * 1e3


def prefilled(model, prompt: list[int], context: int, depth: int = 0) -> tuple[PromptCache, mx.array]:
    pc = PromptCache(model)
    pc.draft_with(depth)
    pc.ensure(len(prompt) + context)
    hidden = pc.prefill(mx.array(prompt)[None])
    mx.eval(hidden, [c.state for c in pc.cache])
    pc.tokens = list(prompt)
    return pc, hidden


def rewind(caches: list, states: list, n: int) -> None:
    """Give the caches these states with their offsets moved back by n (the step's tokens forgotten)."""
    for c, s in zip(caches, states):
        c.state = dict(s, offset=s["offset"] - n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--context", type=int, default=300, help="cache capacity beyond the prompt")
    a = p.parse_args()
    if (Path(a.model) / "tokenizer.json").exists():
        model, tokenizer = load(a.model)
        prompt = tokenizer.encode("<｜User｜>What is 4821 + 377?<｜Assistant｜><think>\n")
    else:
        model, prompt = load_model(a.model), list(range(3, 21))
    print(f"{mx.default_device()}, {a.model}, {len(model.layers)} layers, {len(model.mtp)} MTP module(s)")

    pc, _ = prefilled(model, prompt, a.context)
    step = compiled_steps(model).next_token(GREEDY)
    y = mx.array([[5]])

    def plain():
        token, states = step(y, [c.state for c in pc.cache])
        rewind(pc.cache, states, 1)
        return token

    print(f"plain step (head and sampling included)  {per_call_ms(plain, a.steps):7.3f} ms")
    states = [c.state for c in pc.cache]
    tic = time.perf_counter()
    for _ in range(a.steps):
        step(y, states)  # building the step's graph only, never evaluated: the host's share of a call
    print(f"plain step, host time of the call only     {(time.perf_counter() - tic) / a.steps * 1e3:7.3f} ms")

    for n in range(1, len(model.mtp) + 2):
        pc, _ = prefilled(model, prompt, a.context)

        def body(tokens, states):
            caches = [StaticKVCache.wrap(s) for s in states]
            return model.model(tokens, caches)[:, -1].sum(), [c.state for c in caches]

        forward, tokens = mx.compile(body, inputs=[model]), mx.array([[5] * n])

        def run():
            total, states = forward(tokens, [c.state for c in pc.cache])
            rewind(pc.cache, states, n)
            return total

        print(f"forward pass on {n} token(s), no head      {per_call_ms(run, a.steps):7.3f} ms")

    for depth in range(1, len(model.mtp) + 1):
        pc, hidden = prefilled(model, prompt, a.context, depth)
        ahead = mx.concatenate([mx.array(prompt[1:], mx.int32), mx.array([5])])[None]
        current = {"y": mx.array([5]), "drafts": pc.draft(hidden, ahead)}

        def speculative():
            targets, accepted, current["y"], current["drafts"] = pc.speculate(current["y"], current["drafts"], GREEDY)
            kept = accepted + 1
            for caches in (pc.cache, pc.mtp_cache):
                rewind(caches, [c.state for c in caches], kept)
            return targets

        print(f"speculative step, {depth} draft(s)              {per_call_ms(speculative, a.steps):7.3f} ms")

    for depth in range(len(model.mtp) + 1):
        stats: dict = {}
        for _ in range(2):  # the first compiles
            tic, got = time.perf_counter(), 0
            for new in generate_tokens(model, prompt, max_tokens=a.context, mtp=depth, stats=stats):
                got += len(new)
            seconds = time.perf_counter() - tic
        per = f", {1 + stats['accepted'] / max(stats['drafted'] / depth, 1):.2f} tokens/step" if depth else ""
        print(f"token loop, {depth} draft(s): {got / seconds:8.1f} tok/s ({seconds / got * 1e3:.3f} ms/token{per})")


if __name__ == "__main__":
    main()
