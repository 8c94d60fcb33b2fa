"""`load_model` / `load`: a checkpoint folder or hub id -> an MLX model (and tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import mlx.core as mx

from .config import ModelArgs
from .models import Model
from .weights import check_weights, quantize_like, read_weights

BUNDLED = Path(__file__).parent / "assets" / "nano-r1"  # the model every command uses by default

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.jinja", "*.md"]

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def resolve(path_or_repo: Union[str, Path, None]) -> Path:
    """A local folder as is; None the bundled model; anything else a hub id, fetched (or found in the
    cache) by huggingface_hub."""
    if path_or_repo is None:
        if not (BUNDLED / "config.json").exists():
            raise FileNotFoundError(f"the bundled model is not in this installation ({BUNDLED}); pass a model folder")
        return BUNDLED
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    if str(path_or_repo).count("/") != 1 or str(path_or_repo).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path_or_repo}: no such folder (and not a hub id of the form 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_repo), allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline with an empty cache, unknown repo, no network
        raise FileNotFoundError(
            f"{path_or_repo}: not a local folder, and the hub could not provide it ({type(e).__name__}: {e}). "
            "Pass a local folder, or download it first where the hub is reachable."
        ) from None


def _dtype(dtype) -> Optional[mx.Dtype]:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(path_or_repo: Union[str, Path], dtype=None, lazy: bool = False, expert_memory=None,
               offload: Optional[dict] = None) -> Model:
    """Build the model that config.json describes and fill it with the checkpoint's weights.

    dtype: None keeps the stored dtype (FP8 becomes bfloat16), or "float32" / "float16" / "bfloat16".
    lazy: leave weights unevaluated (read from disk on first use).
    expert_memory: offload the routed experts ("8GB", "25%" of them, or bytes): they stay in the checkpoint
    files and a slot bank of that size holds the resident ones (see mlx_deepseek.offload; `offload` passes
    its options: policy, profile, pin, prefetch, reader, decay).
    """
    folder = resolve(path_or_repo)
    args = ModelArgs.from_file(folder)
    dtype = _dtype(dtype)
    problems: list[str] = []
    weights = read_weights(folder, args, dtype, problems)
    weights = for_device(weights, args)
    model = Model(args)
    if args.quantization is not None:
        quantize_like(model, args.quantization, set(weights))
    if expert_memory is not None:
        from .offload import offload_experts

        offload_experts(model, folder, expert_memory, dtype=dtype, **(offload or {}))
        weights = {k: v for k, v in weights.items() if ".switch_mlp." not in k}  # lazy, so never read
    check_weights(model, weights, str(folder), problems)
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model


CUDA_MIN_QUANTIZED_INPUT = 128
"""MLX 0.32's CUDA `quantized_matmul` gets products with a 64-wide input wrong at more than one row (4 bits:
wrong values, 8 bits: no kernel; H200, BENCHMARKS.md), so on CUDA narrower quantized layers load dequantized."""


def for_device(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """The checkpoint's tensors as the default device can run them. CPU: unquantized routed experts in float32
    (MLX's CPU gather_mm runs only in float32). CUDA: quantized layers whose input is narrower than
    CUDA_MIN_QUANTIZED_INPUT dequantized, and marked float in `args.quantization` (so a saved copy says so)."""
    if mx.default_device() == mx.cpu:
        return {
            k: v.astype(mx.float32) if ".switch_mlp." in k and v.dtype in (mx.float16, mx.bfloat16) else v
            for k, v in weights.items()
        }
    if args.quantization is None or not mx.cuda.is_available():
        return weights
    return dequantize_narrow(weights, args, CUDA_MIN_QUANTIZED_INPUT)


def dequantize_narrow(weights: dict[str, mx.array], args: ModelArgs, min_input: int) -> dict[str, mx.array]:
    """`weights` with each quantized layer whose input is narrower than `min_input` dequantized (in its scales'
    dtype); `args.quantization` gets a copy that marks those layers float."""
    q = dict(args.quantization)
    out = dict(weights)
    for key in weights:
        if not key.endswith(".scales"):
            continue
        path = key[: -len(".scales")]
        params = args.quantization_of(path)
        bits, group_size, mode = params["bits"], params["group_size"], params.get("mode", "affine")
        w = weights[f"{path}.weight"]
        if w.shape[-1] * 32 // bits >= min_input:
            continue
        biases = out.pop(f"{path}.biases", None)
        out[f"{path}.weight"] = mx.dequantize(w, out.pop(key), biases, group_size=group_size, bits=bits, mode=mode)
        q[path] = False
    args.quantization = q
    return out


def load(path_or_repo: Union[str, Path], dtype=None, lazy: bool = False, expert_memory=None,
         offload: Optional[dict] = None):
    """(model, tokenizer) from a checkpoint folder or hub id (options as load_model's)."""
    from .tokenizer import load_tokenizer

    folder = resolve(path_or_repo)
    model = load_model(folder, dtype=dtype, lazy=lazy, expert_memory=expert_memory, offload=offload)
    return model, load_tokenizer(folder)
