"""Cold-start SFT (R1 §2.3.1): fine-tune a model on chat-formatted reasoning traces, the loss on the
assistant's tokens only (`<think>` trace, answer, EOS); the prompt tokens are context, not targets.

Same loop as pretraining (`loop.Trainer` with `mask_prompt=True`): MTP loss, bias balancing, checkpoints,
resume. The model folder's tokenizer is used and copied into every saved folder.

`adapters` (LoRA/DoRA settings) trains adapters on the frozen model instead of all its weights (a gentler
fine-tune: it moves the model less, and forgets less of what pretraining taught); out/model has them fused in,
out/adapters holds them.

`grow_mtp=D` trains new MTP modules onto a finished model instead: the model gets D sequential modules (V3
§2.2), each new one starting as a copy of the last, and only the new ones train (the main model, the old
modules and every router bias stay as they are), so speculative decoding can draft D tokens a step.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from ..models import Model
from .lora import LoraSettings
from .loop import TrainConfig, Trainer, load_for_training, run_folder

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
    grow_mtp: Optional[int] = None,
    adapters: Optional[LoraSettings] = None,
) -> Path:
    """Fine-tune the model at `model_path` (None: the bundled model) into `out`; returns out/model."""
    cfg = replace(cfg or sft_config(), mask_prompt=True)
    out = run_folder(out, resume)
    model, tok, folder = load_for_training(model_path)
    if grow_mtp is not None and adapters is not None:
        raise ValueError("grow_mtp trains whole new MTP modules; leave out the adapters (--finetune lora)")
    if grow_mtp is not None:
        model = with_mtp_modules(model, grow_mtp, folder)
    if grow_mtp is not None or adapters is not None:
        cfg = replace(cfg, bias_gamma=0.0)  # the bias update would move the frozen main model's routers
    trainer = Trainer(model, tok, cfg, out, progress=progress, tokenizer_dir=folder, adapters=adapters,
                      base_path=folder)
    return trainer.run(resume=resume)


def with_mtp_modules(model: Model, depth: int, folder: Path) -> Model:
    """`model` with `depth` MTP modules, the new ones copies of its last, and only those trainable."""
    have = len(model.mtp)
    if not 0 < have < depth:
        raise ValueError(f"{folder}: grow_mtp={depth} must exceed the model's {have} MTP module(s), and it needs one "
                         "to copy (train the first with the MTP loss in pretraining or SFT)")
    deeper = Model(replace(model.args, num_nextn_predict_layers=depth))
    weights = dict(tree_flatten(model.parameters()))
    last = f"mtp.{have - 1}."
    for k in range(have, depth):
        weights.update({f"mtp.{k}." + n[len(last):]: w for n, w in weights.items() if n.startswith(last)})
    deeper.load_weights(list(weights.items()))
    mx.eval(deeper.parameters())
    deeper.freeze()
    for module in deeper.mtp[have:]:
        module.unfreeze()
    return deeper
