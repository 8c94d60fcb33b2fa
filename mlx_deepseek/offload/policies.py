"""Which resident expert a miss evicts: LRU, LFU with decay, pinning from a profile; Belady's optimum and
trace replay (hit rates of each policy across cache sizes, from an expert trace)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


class Policy:
    """Scores every expert of one layer; a miss evicts the evictable resident expert of lowest score.

    `access(experts, counts)` is called once per forward pass of the layer with the distinct experts it
    used (and how many tokens chose each); `score` is read when choosing a victim.
    """

    name = "base"

    def __init__(self, n_experts: int):
        self.score = np.zeros(n_experts, dtype=np.float64)
        self.tick = 0

    def access(self, experts: np.ndarray, counts: np.ndarray) -> None:
        self.tick += 1

    def victim(self, resident: np.ndarray, evictable: np.ndarray) -> int:
        """Index into `resident` (expert per slot, -1 when free) of the slot to reuse: a free one first."""
        free = np.flatnonzero((resident < 0) & evictable)
        if len(free):
            return int(free[0])
        candidates = np.flatnonzero(evictable)
        if not len(candidates):
            raise RuntimeError("no evictable slot: every slot holds an expert this step needs or a pinned one")
        return int(candidates[np.argmin(self.score[resident[candidates]])])


class LRU(Policy):
    """Least recently used: score = the pass that last used the expert."""

    name = "lru"

    def access(self, experts, counts):
        self.tick += 1
        self.score[experts] = self.tick


class LFUDecay(Policy):
    """Least frequently used with exponential decay: score = sum over past passes of (tokens that chose
    the expert) * decay^age, so old popularity fades (half-life = log 0.5 / log decay passes)."""

    name = "lfu"

    def __init__(self, n_experts: int, decay: float = 0.9):
        super().__init__(n_experts)
        self.decay = decay

    def access(self, experts, counts):
        self.tick += 1
        self.score *= self.decay
        self.score[experts] += counts


POLICIES = {"lru": LRU, "lfu": LFUDecay}


def make_policy(name: str, n_experts: int, **kwargs) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"expert policy {name!r}: expected one of {sorted(POLICIES)}")
    return POLICIES[name](n_experts, **kwargs)


# ---- profiles: which experts are hot --------------------------------------------------------------------
def load_profile(source) -> dict[int, np.ndarray]:
    """Per MoE layer, how often each expert was chosen: from an ExpertTrace, its to_dict(), the `experts`
    object of `mlx-deepseek generate --json`, the whole --json output, or a JSON file holding any of them."""
    if isinstance(source, (str, Path)):
        source = json.loads(Path(source).read_text())
    if hasattr(source, "load") and hasattr(source, "layers") and not isinstance(source, dict):
        return {layer: np.asarray(row) for layer, row in zip(source.layers, source.load)}
    if isinstance(source, dict) and isinstance(source.get("experts"), dict):
        source = source["experts"]
    if not isinstance(source, dict) or "layers" not in source or "load" not in source:
        raise ValueError("an expert profile needs 'layers' and 'load' (the 'experts' object of generate --json)")
    return {int(layer): np.asarray(row, dtype=np.float64) for layer, row in zip(source["layers"], source["load"])}


def split_slots(budget_slots: int, n_layers: int, n_experts: int, minimum: int,
                profile: Optional[Sequence[np.ndarray]] = None) -> list[int]:
    """Slots per layer summing to at most `budget_slots`, each in [minimum, n_experts]. Without a profile,
    an even split; with one, every slot beyond the minimum goes to the layer whose next-hottest
    non-resident expert is chosen most often (the split that maximises a static cache's hit rate)."""
    if budget_slots < minimum * n_layers:
        raise ValueError(f"{budget_slots} slots cannot give {n_layers} layers {minimum} each")
    if profile is None:
        base = min(n_experts, budget_slots // n_layers)
        slots = [base] * n_layers
        for i in range(min(budget_slots - base * n_layers, n_layers)):
            if slots[i] < n_experts:
                slots[i] += 1
        return slots
    ranked = [np.sort(np.asarray(p, dtype=np.float64))[::-1] / max(float(np.sum(p)), 1.0) for p in profile]
    slots = [minimum] * n_layers
    for _ in range(min(budget_slots, n_layers * n_experts) - minimum * n_layers):
        gains = [r[s] if s < n_experts else -1.0 for r, s in zip(ranked, slots)]
        best = int(np.argmax(gains))
        if gains[best] < 0:
            break
        slots[best] += 1
    return slots


# ---- trace replay -----------------------------------------------------------------------------------------
def replay(requests: Sequence[np.ndarray], n_experts: int, capacity: int, policy: str = "lru", **kwargs) -> float:
    """Hit rate of one layer's cache of `capacity` experts on a request sequence (per token: the experts it
    chose). policy: 'lru', 'lfu' (with decay) or 'belady' (evicts the expert used furthest in the future:
    the optimum for any policy that loads on demand)."""
    resident = np.full(capacity, -1, dtype=np.int64)
    where = np.full(n_experts, -1, dtype=np.int64)  # slot of each expert
    hits = total = 0
    if policy == "belady":
        nxt = _next_uses(requests, n_experts)
        pol = Policy(n_experts)
    else:
        pol = make_policy(policy, n_experts, **kwargs)
    for t, req in enumerate(requests):
        experts, counts = np.unique(np.asarray(req).reshape(-1), return_counts=True)
        needed = np.zeros(n_experts, dtype=bool)
        needed[experts] = True
        if policy == "belady":
            pol.score[:] = -nxt[t]  # furthest next use -> lowest score
        for e in experts:
            total += 1
            if where[e] >= 0:
                hits += 1
                continue
            evictable = ~needed[np.maximum(resident, 0)] | (resident < 0)
            s = pol.victim(resident, evictable)
            if resident[s] >= 0:
                where[resident[s]] = -1
            resident[s], where[e] = e, s
        pol.access(experts, counts)
    return hits / max(total, 1)


def _next_uses(requests: Sequence[np.ndarray], n_experts: int) -> np.ndarray:
    """[T, n_experts]: the first step after t that requests each expert (T + 1 when never again)."""
    T = len(requests)
    out = np.empty((T, n_experts), dtype=np.int64)
    upcoming = np.full(n_experts, T + 1, dtype=np.int64)
    for t in range(T - 1, -1, -1):
        out[t] = upcoming
        upcoming[np.asarray(requests[t]).reshape(-1)] = t
    return out


def replay_table(trace_experts: Sequence[np.ndarray], n_experts: int, fractions: Sequence[float],
                 top_k: int, policies: Sequence[str] = ("lru", "lfu", "belady")) -> list[dict]:
    """Mean hit rate over MoE layers of each policy at each cache size (a fraction of the experts per layer,
    at least top_k). trace_experts: per token [n_layers, top_k] (ExpertTrace.experts)."""
    per_layer = np.stack(trace_experts, axis=1)  # [n_layers, T, k]
    rows = []
    for f in fractions:
        capacity = max(top_k, min(n_experts, int(round(f * n_experts))))
        row = {"fraction": f, "slots": capacity}
        for p in policies:
            row[p] = float(np.mean([replay(layer, n_experts, capacity, p) for layer in per_layer]))
        rows.append(row)
    return rows
