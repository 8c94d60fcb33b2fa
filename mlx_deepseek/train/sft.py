"""Cold-start SFT (R1 §2.3.1): fine-tune a model on chat-formatted reasoning traces, the loss on the
assistant's tokens only (`<think>` trace, answer, EOS); the prompt tokens are context, not targets.

Same loop as pretraining (`loop.Trainer` with `mask_prompt=True`): MTP loss, bias balancing, checkpoints,
resume. The model folder's tokenizer is used and copied into every saved folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

from ..loading import load_model, resolve
from ..tokenizer import load_tokenizer
from .loop import STATE_FILE, TrainConfig, Trainer

SFT_DEFAULTS = {"lr": 1e-3, "warmup": 20, "steps": 500, "mask_prompt": True}


def sft_config(**overrides) -> TrainConfig:
    """TrainConfig with SFT's defaults (lower lr, short warmup, prompt masked)."""
    return TrainConfig.from_dict({**SFT_DEFAULTS, **overrides})


def sft(
    model_path: Union[str, Path, None],
    out: Union[str, Path],
    cfg: Optional[TrainConfig] = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Fine-tune the model at `model_path` (None: the bundled model) into `out`; returns out/model."""
    cfg = replace(cfg or sft_config(), mask_prompt=True)
    out = Path(out)
    if out.exists() and any((out / "checkpoints").glob(f"step-*/{STATE_FILE}")) and not resume:
        raise ValueError(f"{out} holds checkpoints of an earlier run; pass resume=True (--resume) or a new folder")
    folder = resolve(model_path)
    model = load_model(folder, dtype="float32")
    if model.args.quantization is not None:
        raise ValueError(f"{folder}: a quantized model; fine-tune the float checkpoint (or dequantize it first)")
    tok = load_tokenizer(folder)
    trainer = Trainer(model, tok, cfg, out, progress=progress, tokenizer_dir=folder)
    return trainer.run(resume=resume)
