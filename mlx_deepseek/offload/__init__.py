"""Unified-memory expert offloading: routed experts stay in the checkpoint's safetensors files and a fixed
per-layer slot bank holds the resident ones, within a memory budget (`expert_memory`).

`load(path, expert_memory="8GB")` (or "25%" of the routed experts' bytes) builds the model without ever
reading the expert tensors, swaps each DeepSeekMoE's `switch_mlp` for an OffloadedSwitchGLU and attaches
the ExpertOffloader as `model.offloader` (stats, policy, close). Greedy outputs are token-identical to the
all-resident model. The offloaded forward pass syncs once per MoE layer (it must know the routed experts
before it can read them), so decoding runs uncompiled (PromptCache checks `model.offloader`).
"""

from __future__ import annotations

import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import numpy as np

from ..models.moe import DeepSeekMoE
from .policies import load_profile, make_policy, split_slots
from .slots import MX_DTYPES, LayerStats, OffloadedSwitchGLU, SlotBank, bank_dtype
from .source import ExpertLayout, ExpertReader, expert_layout

__all__ = ["ExpertOffloader", "offload_experts", "parse_memory"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_memory(spec: Union[str, int, float], total: int) -> int:
    """Bytes from '8GB', '512MiB', '25%' (of `total`, the routed experts' bytes) or a number of bytes."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return int(spec)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*", str(spec))
    if m is None or (m.group(2) != "%" and m.group(2).upper() not in _UNITS):
        raise ValueError(f"expert_memory={spec!r}: expected a size like '8GB', '512MiB' or a share like '25%'")
    value, unit = float(m.group(1)), m.group(2)
    if unit == "%":
        if not 0 < value <= 100:
            raise ValueError(f"expert_memory={spec!r}: a share must be in (0, 100]%")
        return int(total * value / 100)
    return int(value * _UNITS[unit.upper()])


class ExpertOffloader:
    """The slot banks of a model, the reader, the prefetcher and the statistics.

    Statistics are kept per phase: a forward pass of at most DECODE_POSITIONS positions per sequence (a
    decode step, or MTP's verification of [token, draft]) is decode; longer ones are prefill. The first
    MoE layer of a pass decides, so a prefill's last block (run on the last position only) stays prefill.
    """

    DECODE_POSITIONS = 2

    def __init__(self, banks: list[SlotBank], reader: ExpertReader, budget: int, total: int, policy: str,
                 prefetch: bool, gates: dict):
        self.banks, self.reader, self.budget, self.total = banks, reader, budget, total
        self.policy, self.prefetch = policy, prefetch
        self._next = {}  # bank -> (next layer's bank, its router) for prefetching
        for a, b in zip(banks, banks[1:]):
            if b.layer == a.layer + 1:
                self._next[id(a)] = (b, gates[b.layer])
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch") if prefetch else None
        self._pending: dict[int, Future] = {}
        self._phase: Optional[str] = None

    @property
    def bank_bytes(self) -> int:
        return sum(b.expert_bytes * b.n_slots for b in self.banks)

    def run(self, bank: SlotBank, x: mx.array, indices: mx.array) -> mx.array:
        """One MoE layer's routed experts: the one sync (indices, and the next layer's guess), the misses, the
        remapped batched matmul; then the next layer's likely experts are read while this one computes."""
        if bank is self.banks[0] or self._phase is None:  # the first MoE layer of a pass names its phase
            self._phase = "decode" if x.ndim < 2 or x.shape[-2] <= self.DECODE_POSITIONS else "prefill"
        phase = self._phase
        follow = self._next.get(id(bank)) if self.prefetch and phase == "decode" else None
        guess = follow[1](x)[0] if follow else None
        mx.eval(indices, *([guess] if guess is not None else []))
        pending = self._pending.pop(id(bank), None)
        if pending is not None:
            tic = time.perf_counter()
            pending.result()
            bank.stats[phase].stall_s += time.perf_counter() - tic
        y = bank.run(x, np.array(indices), phase)
        if guess is not None:
            nxt = follow[0]
            self._pending[id(nxt)] = self._pool.submit(nxt.prefetch, np.unique(np.array(guess)))
        return y

    def drain(self) -> None:
        """Wait for reads in flight (before stats are read or slots are changed from outside)."""
        for f in self._pending.values():
            f.result()
        self._pending.clear()

    def reset_stats(self) -> None:
        self.drain()
        for b in self.banks:
            b.stats = {"decode": LayerStats(), "prefill": LayerStats()}

    def set_naive(self, naive: bool) -> None:
        """The benchmark's baseline: no cache, every pass reads every expert it selects."""
        for b in self.banks:
            b.naive = naive

    def stats(self) -> dict:
        """Per phase (decode, prefill) and per MoE layer: hit rate, bytes read per token, time stalled on reads."""
        self.drain()
        out = {
            "policy": self.policy, "reader": self.reader.method, "prefetch": self.prefetch,
            "write_through": all(b.write_through for b in self.banks),
            "budget_bytes": self.budget, "bank_bytes": self.bank_bytes, "expert_bytes": self.total,
            "residency": self.bank_bytes / max(self.total, 1),
        }
        for phase in ("decode", "prefill"):
            total = LayerStats()
            layers = []
            for b in self.banks:
                st = b.stats[phase]
                total.add(st)
                layers.append({"layer": b.layer, "slots": b.n_slots, **st.summary()})
            tokens = max((b.stats[phase].tokens for b in self.banks), default=0)
            summary = total.summary()
            summary.update(tokens=tokens, bytes_read_per_token=total.bytes_read / max(tokens, 1), layers=layers)
            out[phase] = summary
        return out

    def close(self) -> None:
        self.drain()
        if self._pool is not None:
            self._pool.shutdown()
        self.reader.close()


def offload_experts(model, folder: Union[str, Path], expert_memory, policy: str = "lru", reader: str = "mmap",
                    profile=None, pin: float = 0.0, prefetch: bool = False, decay: float = 0.9,
                    dtype: Optional[mx.Dtype] = None, write_through: Optional[bool] = None,
                    layout: Optional[ExpertLayout] = None) -> ExpertOffloader:
    """Swap every DeepSeekMoE's routed experts for a slot bank filled from `folder`'s files.

    expert_memory: the banks' total size ('8GB', '25%' of the routed experts, or bytes), split across the MoE
    layers (evenly, or by `profile`: where a static cache gains most); every layer gets at least top_k slots.
    policy: 'lru' or 'lfu' (with `decay` per pass). profile: expert counts per layer (an ExpertTrace, the
    `experts` of `generate --json`, or a JSON file of it); `pin` (0-1): the share of each layer's slots given
    to its hottest experts for good. prefetch: read the next layer's likely experts (its router on this
    layer's input) while this layer computes. reader: 'mmap' (the default: faster than 'pread' in
    `bench offload`, from the page cache and cold; BENCHMARKS.md) or 'pread'.
    Call before the model's weights are evaluated: the replaced expert tensors are never read.
    """
    args = model.args
    layout = layout or expert_layout(Path(folder), args)
    moes = [(path, m) for path, m in model.named_modules() if isinstance(m, DeepSeekMoE)]
    moes.sort(key=lambda pm: pm[1].layer)
    missing = [p for p, _ in moes if p not in layout.layers]
    if missing:
        raise ValueError(f"{folder}: no routed experts stored for {', '.join(missing)}")
    per_expert = {}
    for path, _ in moes:
        per_expert[path] = sum(
            int(np.prod(s[0].shape)) * MX_DTYPES[bank_dtype(s[0], dtype)].size for s in layout.layers[path].values()
        )
    n_experts, top_k = args.n_routed_experts, args.num_experts_per_tok
    total = sum(per_expert.values()) * n_experts
    budget = parse_memory(expert_memory, total)
    largest = max(per_expert.values())
    need = top_k * len(moes) * largest
    if budget < need:
        raise ValueError(
            f"expert_memory={expert_memory!r} is {budget / 1e9:.3g} GB; offloading needs at least {need / 1e9:.3g} GB "
            f"({top_k} experts in each of {len(moes)} MoE layers, {largest / 1e6:.3g} MB each) of the "
            f"{total / 1e9:.3g} GB of routed experts"
        )
    counts = load_profile(profile) if profile is not None else None
    if pin and counts is None:
        raise ValueError("pinning hot experts needs a profile (an expert trace: generate --json's 'experts')")
    rows = [counts.get(m.layer, np.ones(n_experts)) for _, m in moes] if counts is not None else None
    slots = split_slots(budget // largest, len(moes), n_experts, top_k, rows)

    expert_reader = ExpertReader(reader)
    banks, gates = [], {}
    for (path, moe), n in zip(moes, slots):
        bank = SlotBank(moe.layer, moe.switch_mlp, layout.layers[path], n, make_policy(policy, n_experts, **(
            {"decay": decay} if policy == "lfu" else {})), expert_reader, dtype, write_through)
        banks.append(bank)
        gates[moe.layer] = moe.gate
    offloader = ExpertOffloader(banks, expert_reader, budget, total, policy, prefetch, gates)
    for (path, moe), bank, row in zip(moes, banks, rows or [None] * len(banks)):
        moe.switch_mlp = OffloadedSwitchGLU(bank, offloader)
        if pin and row is not None:
            hot = np.argsort(-np.asarray(row), kind="stable")[: int(pin * bank.n_slots)]
            bank.pin(hot[np.asarray(row)[hot] > 0])
    model.offloader = offloader
    return offloader
