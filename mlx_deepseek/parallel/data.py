"""Data parallelism: every rank a shard of the batch, gradients averaged across ranks in one function."""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

Group = mx.distributed.Group


def active(group: Optional[Group]) -> Optional[Group]:
    """The group if it spans more than one rank, else None (a single process runs the plain code)."""
    return group if group is not None and group.size() > 1 else None


def average_gradients(grads: Any, group: Optional[Group]) -> Any:
    """The mean of every rank's gradients (mlx.nn.average_gradients: all_sum / world size, small arrays
    packed into a few large messages). Unchanged without a multi-rank group."""
    if active(group) is None:
        return grads
    return nn.average_gradients(grads, group=group)


def global_sum(x: mx.array, group: Optional[Group]) -> mx.array:
    """all_sum over the group (the array itself in a single process)."""
    return x if active(group) is None else mx.distributed.all_sum(x, group=group)


def rank_block(rows: int, group: Optional[Group]) -> slice:
    """This rank's block of `rows` items split in equal contiguous blocks, rank order (all of them in one
    process)."""
    if active(group) is None:
        return slice(0, rows)
    n, r = group.size(), group.rank()
    if rows % n:
        raise ValueError(f"a batch of {rows} rows does not split over {n} ranks; use a multiple of {n}")
    per = rows // n
    return slice(r * per, (r + 1) * per)


def shard_rows(arrays, group: Optional[Group]):
    """This rank's rows of each array (the batch split in equal contiguous blocks, rank order)."""
    if active(group) is None:
        return arrays
    block = rank_block(arrays[0].shape[0], group)
    return tuple(a[block] for a in arrays)


def gather_rows(x, group: Optional[Group]) -> np.ndarray:
    """Every rank's rows of `x` (the same shape on each) concatenated in rank order, as float64, bit-exact
    (sent as raw 32-bit words, so any backend carries them); `x` itself in one process."""
    x = np.atleast_1d(np.ascontiguousarray(x, dtype=np.float64))
    if active(group) is None:
        return x
    words = mx.array(x.reshape(len(x), -1).view(np.uint32))
    out = np.array(mx.distributed.all_gather(words, group=group, stream=mx.cpu)).view(np.float64)
    return out.reshape(group.size() * len(x), *x.shape[1:])


def common_seed(seed: Optional[int], group: Optional[Group]) -> Optional[int]:
    """One sampling seed for every rank (so that all of them draw the same tokens): the given one, or
    rank 0's random pick when none is given."""
    if active(group) is None or seed is not None:
        return seed
    mine = int(np.random.randint(0, 2**31 - 1)) if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array(mine, mx.int32), group=group, stream=mx.cpu).item())
