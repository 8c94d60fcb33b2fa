"""Pipeline parallelism: each rank runs a block of decoder layers, in rank order.

Rank 0 embeds the tokens and runs the first block; each stage receives the hidden state from the rank
before it and sends its output to the rank after it; the last stage's output is summed over all ranks
(the others contribute zeros, so the sum is exact) and every rank applies the final norm and the head:
all ranks hold the same logits and sample the same token. The embedding, the final norm and the head are
on every rank (replicated); the decoder layers and their KV caches only on their own rank.

Between stages the hidden state travels in the model's activation dtype (that of the final norm): exact
for float32 and for models that compute in one float type; a CPU run of a bfloat16 model (whose routed
experts run in float32) rounds the residual stream to bfloat16 at each stage boundary.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .data import active


def split(n: int, rank: int, size: int) -> range:
    """Rank `rank`'s contiguous block of n items (layers, experts) split over `size` ranks, the first
    n % size ranks one item larger."""
    if size > n:
        raise ValueError(f"{n} items cannot be split over {size} ranks; use at most {n} ranks")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class PipelineStage:
    """Decoder layers `layers` (of `n_layers`) of a pipeline over `group`; DeepSeekModel calls `receive`
    before its layers and `pass_on` after them."""

    def __init__(self, group: mx.distributed.Group, layers: range, n_layers: int, norm: nn.Module):
        self.group, self.layers, self.norm = group, layers, norm
        self.rank, self.size = group.rank(), group.size()
        self.first, self.last = layers.start == 0, layers.stop == n_layers

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype on the wire: the activation dtype (that of the final norm's weight, as loaded)."""
        return self.norm.weight.dtype

    def receive(self, h: mx.array) -> mx.array:
        """The previous stage's output (same shape as the embedded tokens `h`); `h` itself on the first."""
        if self.first:
            return h
        return mx.distributed.recv(h.shape, self.dtype, self.rank - 1, group=self.group)

    def pass_on(self, h: mx.array, last_only: bool) -> mx.array:
        """Send this stage's output on, and return the last stage's output [B, L or 1, D] on every rank."""
        if not self.last:
            sent = mx.distributed.send(h.astype(self.dtype), self.rank + 1, group=self.group)
            shape = (h.shape[0], 1 if last_only else h.shape[1], h.shape[2])
            h = mx.depends(mx.zeros(shape, self.dtype), sent)
        return mx.distributed.all_sum(h.astype(self.dtype), group=self.group)


def pipeline(model: nn.Module, group: Optional[mx.distributed.Group] = None) -> nn.Module:
    """Keep only this rank's block of decoder layers (a loaded model's others are dropped) and join the
    stages with send/recv. The MTP modules are dropped (speculative decoding does not run pipelined).
    A group of one rank leaves the model as it is."""
    group = active(group if group is not None else mx.distributed.init())
    if group is None:
        return model
    layers = list(model.model.layers)
    mine = split(len(layers), group.rank(), group.size())
    model.model.layers = layers[mine.start : mine.stop]
    model.mtp = []
    model.model.pipeline = PipelineStage(group, mine, len(layers), model.model.norm)
    return model
