"""Expert parallelism: each rank holds a block of every MoE layer's routed experts.

Activations are replicated (every rank runs attention, the router and the shared experts on all tokens).
`LocalExperts` applies this rank's experts to the token slots routed to them, on the global expert
indices the router chose; `DeepSeekMoE` then sums the gate-weighted parts of all ranks with one
`all_sum` (its `expert_group` hook) before the shared experts are added. Memory and, in decoding, weight
reads per rank fall with the number of ranks; each rank still multiplies every slot (the foreign ones
against a local expert, then zeroed), so the batched gather_mm stays one call with static shapes and the
forward pass stays lazy (no index round-trip to the host).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..models.moe import DeepSeekMoE, RoutedExperts
from .data import active
from .pipeline import split


class LocalExperts(RoutedExperts):
    """Routed experts [first, first + count) of a layer, called with global expert indices."""

    @classmethod
    def of(cls, full: RoutedExperts, experts: range) -> "LocalExperts":
        """This rank's block of `full`'s experts (its projections sliced on the expert axis, lazily: the
        slices of a freshly built model are replaced by the loaded weights before anything is computed)."""
        local = cls.__new__(cls)
        nn.Module.__init__(local)
        for name, proj in full.children().items():
            proj.update(tree_map(lambda p: p[experts.start : experts.stop], proj.parameters()))
            setattr(local, name, proj)
        local.first, local.count = experts.start, len(experts)
        return local

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        local = indices - self.first
        mine = (local >= 0) & (local < self.count)
        y = super().__call__(x, mx.where(mine, local, 0))
        return y * mine[..., None].astype(y.dtype)


def shard_experts(model: nn.Module, group: Optional[mx.distributed.Group] = None) -> nn.Module:
    """Keep only this rank's block of experts in every MoE layer (main model and MTP) and combine the
    ranks' parts with all_sum. Works on a loaded model (slicing its experts) and on a freshly built one
    (before its rank-local weights are loaded). A group of one rank leaves the model as it is."""
    group = active(group if group is not None else mx.distributed.init())
    if group is None:
        return model
    for _, moe in model.named_modules():
        if isinstance(moe, DeepSeekMoE) and not isinstance(moe.switch_mlp, LocalExperts):
            n_experts = moe.gate.weight.shape[0]
            moe.switch_mlp = LocalExperts.of(moe.switch_mlp, split(n_experts, group.rank(), group.size()))
            moe.expert_group = group
    return model
