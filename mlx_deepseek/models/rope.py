"""Rotary position embeddings: plain, linear, YaRN and llama3, built from mlx-lm's implementations."""

import math

import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from ..config import ModelArgs


def make_rope(args: ModelArgs, dims: int, traditional: bool) -> nn.Module:
    """RoPE over `dims` features; `traditional` rotates interleaved pairs (DeepSeek's MLA k_pe/q_pe)."""
    return initialize_rope(
        dims,
        base=args.rope_theta,
        traditional=traditional,
        scaling_config=args.rope_scaling,
        max_position_embeddings=args.max_position_embeddings,
    )


def yarn_softmax_scale(args: ModelArgs, head_dim: int) -> float:
    """The attention scale 1/sqrt(d), times mscale^2 under YaRN with `mscale_all_dim` (DeepSeek-V2 §D.1)."""
    scale = head_dim**-0.5
    rs = args.rope_scaling
    if rs is not None and rs.get("mscale_all_dim") and rs["factor"] > 1:
        mscale = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0
        scale *= mscale * mscale
    return scale
