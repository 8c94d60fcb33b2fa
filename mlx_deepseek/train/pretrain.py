"""Pretraining from scratch on the synthetic task corpus (packed; loss on every token).

`pretrain(out, ...)` builds a model from a config (default: the nano-r1 config shipped in
`mlx_deepseek/assets/nano-r1-config.json`), initialises it, and runs the shared loop (`loop.Trainer`):
next-token + MTP loss, aux-loss-free bias balancing, optional balance losses, checkpoints and resume.
The tokenizer is taken from `tokenizer` (a folder) or trained into `out/tokenizer` first. With `init` (a model
folder) pretraining continues from that model's weights, config and tokenizer instead (a fresh optimizer and
schedule; `resume` is for picking up a run of this folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx

from .. import parallel
from ..config import ModelArgs
from ..models import Model
from ..tokenizer import load_tokenizer
from .loop import TrainConfig, Trainer, init_weights, load_for_training, run_folder

NANO_CONFIG = Path(__file__).resolve().parent.parent / "assets" / "nano-r1-config.json"


def model_config(config: Union[None, str, Path, dict], vocab_size: int) -> dict:
    """The model config (a dict, a JSON file or a folder with config.json), its vocab fitted to the tokenizer."""
    if config is None:
        config = NANO_CONFIG
    if not isinstance(config, dict):
        path = Path(config)
        config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    config = dict(config)
    if config.get("vocab_size") != vocab_size:
        config["vocab_size"] = vocab_size
    ModelArgs.from_dict(config)  # checks it
    return config


def ensure_tokenizer(out: Path, tokenizer: Union[None, str, Path], vocab_size: int = 768, seed: int = 0) -> Path:
    """The tokenizer folder to use: `tokenizer` as given, or out/tokenizer (trained there if missing)."""
    if tokenizer is not None:
        return Path(tokenizer)
    folder = Path(out) / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        from .vocab import train_tokenizer

        train_tokenizer(folder, vocab_size=vocab_size, seed=seed, overwrite=True)
    return folder


def pretrain(
    out: Union[str, Path],
    cfg: Optional[TrainConfig] = None,
    config: Union[None, str, Path, dict] = None,
    tokenizer: Union[None, str, Path] = None,
    resume: bool = False,
    progress: bool = True,
    init: Union[None, str, Path] = None,
) -> Path:
    """Pretrain a model into `out` (from scratch, or on from the model folder `init`); returns out/model."""
    cfg = cfg or TrainConfig()
    out = run_folder(out, resume)
    if init is not None and (config is not None or tokenizer is not None):
        raise ValueError(f"init={init}: the model brings its config and tokenizer; leave out config and tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    group = parallel.active(mx.distributed.init())  # data parallelism when started by mlx.launch
    if init is not None:
        model, tok, tok_dir = load_for_training(init)
    else:
        if group is not None and group.rank() != 0:
            mx.eval(parallel.global_sum(mx.array(0.0), group))  # wait for rank 0's tokenizer
        tok_dir = ensure_tokenizer(out, tokenizer)
        if group is not None and group.rank() == 0:
            mx.eval(parallel.global_sum(mx.array(0.0), group))
        tok = load_tokenizer(tok_dir)
        args = ModelArgs.from_dict(model_config(config, len(tok)))
        mx.random.seed(cfg.seed)
        model = Model(args)
        init_weights(model, cfg.seed)
    trainer = Trainer(model, tok, cfg, out, progress=progress, tokenizer_dir=tok_dir, group=group)
    return trainer.run(resume=resume)
