"""Quantization recipes: which module gets how many bits.

A recipe is a function (path, model args, bits, group_size, high_bits) -> False or
{"group_size", "bits", "mode"}. It is asked only about modules that can be quantized (they have
`to_quantized`: Linear, Embedding, the stacked experts' SwitchLinear, MLA's MultiLinear); the router's
`gate` and its `e_score_correction_bias` are plain parameters and are never quantized. A module whose
input width the group size does not divide stays float whatever the recipe says.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

Params = Union[bool, dict]
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def is_routed_expert(path: str) -> bool:
    return ".switch_mlp." in path


def _params(bits: int, group_size: int) -> dict:
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def uniform(path: str, args, bits: int, group_size: int, high_bits: int) -> Params:
    return _params(bits, group_size)


def mixed(path: str, args, bits: int, group_size: int, high_bits: int) -> Params:
    """The bulk of the parameters at `bits`, what every token passes through at `high_bits`."""
    if args.n_routed_experts is not None:
        bulk = is_routed_expert(path)
    else:  # dense families: the MLP is the bulk
        bulk = any(path.endswith(f".mlp.{p}") for p in ("gate_proj", "up_proj", "down_proj"))
    return _params(bits if bulk else high_bits, group_size)


def experts_only(path: str, args, bits: int, group_size: int, high_bits: int) -> Params:
    return _params(bits, group_size) if is_routed_expert(path) else False


RECIPES: dict[str, tuple[Callable[..., Params], str]] = {
    "uniform": (uniform, "every quantizable layer at --q-bits"),
    "mixed": (
        mixed,
        "routed experts at --q-bits; attention, shared experts, dense MLPs, embeddings, lm_head and the MTP "
        "projection at --high-bits (dense families: the MLP at --q-bits, the rest at --high-bits)",
    ),
    "experts-only": (experts_only, "routed experts at --q-bits; everything else stays float"),
}


def get(name: str) -> Callable[..., Params]:
    if name not in RECIPES:
        raise ValueError(f"--recipe {name!r}: unknown; the recipes are {', '.join(RECIPES)} (see --list-recipes)")
    return RECIPES[name][0]


def describe() -> str:
    width = max(len(k) for k in RECIPES)
    return "\n".join(f"{k:<{width}}  {doc}" for k, (_, doc) in RECIPES.items())


def check(bits: Optional[int], group_size: int, high_bits: int) -> None:
    if bits is not None and bits not in BITS:
        raise ValueError(f"--q-bits {bits}: expected one of {BITS}")
    if high_bits not in BITS:
        raise ValueError(f"--high-bits {high_bits}: expected one of {BITS}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"--q-group-size {group_size}: expected one of {GROUP_SIZES}")
