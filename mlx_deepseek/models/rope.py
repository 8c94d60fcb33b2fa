"""Rotary position embeddings: plain, linear, YaRN and llama3, built from mlx-lm's implementations."""

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from ..config import ModelArgs


def make_rope(args: ModelArgs, dims: int, traditional: bool) -> nn.Module:
    """RoPE over `dims` features; `traditional` rotates interleaved pairs (DeepSeek's MLA k_pe/q_pe)."""
    rope = initialize_rope(
        dims,
        base=args.rope_theta,
        traditional=traditional,
        scaling_config=args.rope_scaling,
        max_position_embeddings=args.max_position_embeddings,
    )
    return BatchChunkedRoPE(rope, dims) if mx.cuda.is_available() else rope


def oversized_cuda_block(dims: int, shape: tuple) -> bool:
    """Whether MLX's CUDA RoPE kernel (0.32) would launch this input with thread blocks deeper than CUDA's 64 in z.

    The kernel spans (dims/2 pairs, positions T, batch x ceil(heads/4)) and sizes its block by giving each axis,
    in turn, one more power of two up to 1024 threads; with few pairs and positions (nano-r1 decoding: 8 pairs,
    one position) and 128 or more batch-head slots the z depth reaches 128 and the launch fails
    ("cudaGraphAddKernelNode ... invalid argument"). Real DeepSeek widths (32 pairs) never get there."""
    pairs, positions = dims // 2, shape[-2]
    return shape[0] * _head_slots(shape) >= 128 and (pairs.bit_length() - 1) + (positions.bit_length() - 1) <= 3


def _head_slots(shape: tuple) -> int:
    """The kernel's z slots per batch row: ceil(heads / 4) (a thread rotates four heads)."""
    return -(-math.prod(shape[1:-2]) // 4)


class BatchChunkedRoPE(nn.Module):
    """A RoPE module that rotates inputs `oversized_cuda_block` would reject in batch chunks it accepts."""

    def __init__(self, rope: nn.Module, dims: int):
        super().__init__()
        self.rope, self.dims = rope, dims

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        if not oversized_cuda_block(self.dims, x.shape):
            return self.rope(x, offset=offset)
        rows = max(1, 64 // _head_slots(x.shape))
        per_row = isinstance(offset, mx.array) and offset.ndim > 0
        return mx.concatenate([
            self.rope(x[s : s + rows], offset=offset[s : s + rows] if per_row else offset)
            for s in range(0, x.shape[0], rows)
        ])


def yarn_softmax_scale(args: ModelArgs, head_dim: int) -> float:
    """The attention scale 1/sqrt(d), times mscale^2 under YaRN with `mscale_all_dim` (DeepSeek-V2 §D.1)."""
    scale = head_dim**-0.5
    rs = args.rope_scaling
    if rs is not None and rs.get("mscale_all_dim") and rs["factor"] > 1:
        mscale = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0
        scale *= mscale * mscale
    return scale
