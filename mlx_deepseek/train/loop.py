"""The training loop shared by pretraining and SFT.

One step: next-token cross-entropy (on the tokens the mask selects) + lambda * the MTP cross-entropy
(V3 §2.2: MTP module 0 predicts t_{i+2} from h_i and Emb(t_{i+1})) + the enabled balance losses; AdamW
with linear warmup and cosine decay, gradient clipping; then V3's aux-loss-free bias update from the
step's expert counts. The step is one compiled MLX graph.

An output folder holds:
  metrics.jsonl                 one JSON object per logged step (losses, lr, tokens/s, expert load max/mean)
  checkpoints/step-NNNNNNN/     a loadable model folder (config.json, model.safetensors, mtp.safetensors,
                                tokenizer files) plus trainer/optimizer.safetensors and trainer/state.json
                                (step, data position, the run's settings; the RNG is a function of seed and step); written atomically
  model/                        the final model, without optimizer state
`resume` continues from the newest checkpoint, and the next step is the one an uninterrupted run takes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .. import parallel
from ..loading import load_model, resolve
from ..tokenizer import load_tokenizer
from ..weights import atomic_folder, save_model
from . import balance, lora
from .data import PackedBatches

# Training state lives in a subfolder, so that loaders globbing *.safetensors see only the model.
STATE_FILE = "trainer/state.json"
OPTIMIZER_FILE = "trainer/optimizer.safetensors"


@dataclass
class TrainConfig:
    """Everything a run is: optimisation, losses, balancing, data, logging."""

    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    mtp_weight: float = 0.3  # lambda of V3's MTP loss (0.3, later 0.1, in the paper)
    # V3's bias update speed gamma; 0 disables it. The paper's 0.001 suits its ~10^5 steps; in a run of a
    # few hundred steps it is too slow to stop experts collapsing (nano-r1: max/mean load 7 vs 1.1 at 0.01).
    bias_gamma: float = 1e-2
    seq_aux_alpha: float = 0.0  # V3's complementary sequence-wise balance loss (1e-4 in the paper)
    expert_aux_alpha: float = 0.0  # V2's expert-level balance loss alpha_1 (0.003 in V2)
    device_aux_alpha: float = 0.0  # V2's device-level balance loss alpha_2 (0.05 in V2)
    n_devices: int = 1  # device groups of the device-level loss
    mask_prompt: bool = False  # SFT: loss on assistant tokens only
    split: str = "train"
    data_seed: int = 0
    seed: int = 0  # parameter initialisation
    task_options: dict = field(default_factory=dict)  # kinds / langs / levels for tasks.example_at
    beyond: float = 0.0  # share of (train-side) examples drawn beyond the training levels, at the hard ones
    log_every: int = 10
    eval_every: int = 100  # heldout loss every N steps (0: never)
    save_every: int = 500
    keep_checkpoints: int = 2
    compile: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def check(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "log_every", "keep_checkpoints", "n_devices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.seq_len < 3:
            raise ValueError(f"seq_len={self.seq_len}: the MTP loss needs at least 3 positions")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr}: must be positive")
        if not 0 <= self.beyond <= 1:
            raise ValueError(f"beyond={self.beyond}: a share, between 0 and 1")


def init_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Matrices (linear, embedding, expert stacks, router centroids) ~ N(0, std); norms 1; biases and the
    routing bias 0. (MLX's defaults would leave the router at zero, every expert tied.)"""
    keys = mx.random.split(mx.random.key(seed), len(tree_flatten(model.parameters())))
    new = []
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        if name.endswith("e_score_correction_bias") or name.endswith(".bias"):
            new.append((name, mx.zeros_like(p)))
        elif p.ndim == 1:  # RMSNorm weights
            new.append((name, mx.ones_like(p)))
        else:
            new.append((name, std * mx.random.normal(p.shape, dtype=p.dtype, key=keys[i])))
    model.load_weights(new)
    mx.eval(model.parameters())


def masked_cross_entropy(logits: mx.array, targets: mx.array, mask: mx.array, count=None) -> mx.array:
    """Mean cross-entropy over the masked tokens; `count` replaces their number (data parallelism: this
    rank's share of the global count, so that the ranks' mean is the mean over the whole batch)."""
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
    mask = mask.astype(mx.float32)
    return (ce * mask).sum() / (mx.maximum(mask.sum(), 1.0) if count is None else count)


def schedule(cfg: TrainConfig):
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at the last step."""
    warmup = min(cfg.warmup, cfg.steps - 1)
    decay = optim.cosine_decay(cfg.lr, max(cfg.steps - warmup, 1), cfg.lr * cfg.min_lr_ratio)
    if warmup <= 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(cfg.lr / warmup, cfg.lr, warmup), decay], [warmup])


def run_folder(out, resume: bool) -> Path:
    """`out` as a Path, refused when it holds an earlier run's checkpoints and this run does not resume them."""
    out = Path(out)
    if not resume and any((out / "checkpoints").glob(f"step-*/{STATE_FILE}")):
        raise ValueError(f"{out} holds checkpoints of an earlier run; pass resume=True (--resume) or a new folder")
    return out


def load_for_training(model_path, dequantize: bool = True) -> tuple:
    """(model, tokenizer, folder) of the checkpoint at `model_path` (None: the bundled model) in float32; a quantized
    checkpoint's weights are dequantized, or with dequantize=False left quantized (LoRA over a quantized base)."""
    folder = resolve(model_path)
    model = load_model(folder, dtype="float32")
    if model.args.quantization is not None and dequantize:
        lora.dequantize(model)
        model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
        mx.eval(model.parameters())
    return model, load_tokenizer(folder), folder


class Trainer:
    """Runs TrainConfig on a model with a tokenizer, writing to `out`."""

    def __init__(
        self, model, tokenizer, cfg: TrainConfig, out: str | Path, progress: bool = True,
        tokenizer_dir: Optional[Path] = None, group: Optional[mx.distributed.Group] = None,
        adapters: Optional[lora.LoraSettings] = None, base_path: Optional[Path] = None,
    ):
        """tokenizer_dir: a folder whose tokenizer files every saved model folder gets a copy of.
        group: data parallelism over its ranks (each trains on its rows of every batch; rank 0 writes).
        adapters: train LoRA/DoRA adapters (the model frozen under them) instead of all weights.
        base_path: the model folder trained from (written next to the adapters, for `mlx-deepseek fuse`)."""
        cfg.check()
        self.group = parallel.active(group)
        self.main = self.group is None or self.group.rank() == 0
        if self.group is not None and cfg.batch_size % self.group.size():
            raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the {self.group.size()} ranks")
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        self.base_path = base_path
        self.out = Path(out)
        self.progress = progress
        self.args = model.args
        self.n_experts = self.args.n_routed_experts or 0
        self.moe = balance.moe_layers(model)
        needs_inputs = bool(cfg.seq_aux_alpha or cfg.expert_aux_alpha or cfg.device_aux_alpha)
        if needs_inputs and cfg.device_aux_alpha and self.n_experts % cfg.n_devices:
            raise ValueError(f"n_devices={cfg.n_devices} must divide n_routed_experts={self.n_experts}")
        self._adapt(model, adapters, cfg.seed)
        self.trace = balance.attach(model, record_inputs=needs_inputs) if self.moe else None
        balance.freeze_bias(model)
        model.train()
        self.optimizer = optim.AdamW(
            learning_rate=schedule(cfg), betas=list(cfg.betas), weight_decay=cfg.weight_decay
        )
        self.optimizer.init(model.trainable_parameters())
        self.step = 0
        self.data = PackedBatches(
            tokenizer, cfg.batch_size, cfg.seq_len, cfg.split, cfg.data_seed, cfg.mask_prompt, cfg.task_options,
            beyond=cfg.beyond,
        )
        self._eval_batch = None
        self._step_fn = self._build_step()

    def _adapt(self, model, adapters: Optional[lora.LoraSettings], seed: int) -> None:
        """Train `adapters` (None: all weights): wrap the model's projections unless it has adapters already."""
        self.lora = adapters
        if adapters is not None and not lora.has_adapters(model):
            mx.random.seed(seed)  # the adapters' A matrices are drawn: a run is a function of its seed
            lora.apply_lora(model, adapters)

    # ---- the step ------------------------------------------------------------------------------
    def loss(self, model, ids: mx.array, mask: mx.array, counts: Optional[mx.array] = None):
        """(total, main CE, MTP CE, balance loss, expert counts [moe layers, experts]) of one batch.
        counts: the token counts that normalise the main and MTP CE (default: this batch's; see token_counts)."""
        cfg = self.cfg
        if self.trace is not None:
            self.trace.clear()
        depth = len(model.mtp)
        counts = [None] * (depth + 1) if counts is None else counts
        inputs, targets, tmask = ids[:, :-1], ids[:, 1:], mask[:, 1:]
        hidden = model.model(inputs)
        ce = masked_cross_entropy(model.logits(hidden), targets, tmask, counts[0])
        total = ce
        mtp_ce = mx.array(0.0)
        if depth and cfg.mtp_weight:
            # module k: h^{k-1}_i with Emb(t_{i+k+1}) -> t_{i+k+2}; V3's L_MTP is the mean over the D modules
            h = hidden
            for k in range(depth):
                h, logits = model.mtp_step(h[:, :-1], inputs[:, k + 1 :], k)
                mtp_ce = mtp_ce + masked_cross_entropy(logits, targets[:, k + 1 :], tmask[:, k + 1 :], counts[k + 1])
            mtp_ce = mtp_ce / depth
            total = total + cfg.mtp_weight * mtp_ce
        aux = mx.array(0.0)
        counts = mx.zeros((0, max(self.n_experts, 1)))
        if self.trace is not None:
            aux = balance.balance_losses(
                self.trace, cfg.seq_aux_alpha, cfg.expert_aux_alpha, cfg.device_aux_alpha, cfg.n_devices
            )
            total = total + aux
            counts = balance.layer_counts(self.trace, self.n_experts, [m.layer for m in self.moe])
        return total, ce, mtp_ce, aux, counts

    def _build_step(self):
        model, optimizer, cfg = self.model, self.optimizer, self.cfg
        loss_and_grad = nn.value_and_grad(model, self.loss)

        def step(ids, mask, token_counts):
            (total, ce, mtp_ce, aux, counts), grads = loss_and_grad(model, ids, mask, token_counts)
            grads = parallel.average_gradients(grads, self.group)
            grads, grad_norm = optim.clip_grad_norm(grads, cfg.grad_clip)
            optimizer.update(model, grads)
            return total, ce, mtp_ce, aux, counts, grad_norm

        if cfg.compile:
            state = [model.state, optimizer.state]
            step = partial(mx.compile, inputs=state, outputs=state)(step)
        return step

    def train_step(self, ids: np.ndarray, mask: np.ndarray) -> dict:
        """One optimizer step and the bias update; returns the step's numbers.

        MLX's global RNG is reseeded from (seed, step) first: whatever draws random numbers in a step
        (nothing in the losses here; dropout or sampling later) draws the same after a resume."""
        mx.random.seed((self.cfg.seed * 1_000_003 + self.step) % 2**32)
        out = self._step_fn(mx.array(ids), mx.array(mask), self.token_counts(mask))
        total, ce, mtp_ce, aux, counts, grad_norm = self._across_ranks(*out)
        if self.moe:
            balance.update_bias(self.model, counts, self.cfg.bias_gamma)
        mx.eval(self.model.state, self.optimizer.state, total, ce, mtp_ce, aux, counts, grad_norm)
        nan_guard(total.item(), f"the loss at step {self.step + 1}")
        self.step += 1
        return {
            "loss": total.item(), "ce": ce.item(), "mtp_ce": mtp_ce.item(), "aux": aux.item(),
            "grad_norm": grad_norm.item(), "counts": np.array(counts),
        }

    def token_counts(self, mask: np.ndarray) -> mx.array:
        """The numbers of tokens the main loss and each MTP module's loss average over: this batch's, or with data
        parallelism each rank's share (1 / ranks) of the global ones, so that the mean of the ranks' losses
        (and, with gradients averaged, of their gradients) is the single-process value on the whole batch."""
        tmask = np.asarray(mask)[:, 1:]
        counts = mx.array([float(tmask[:, k:].sum()) for k in range(len(self.model.mtp) + 1)])
        if self.group is None:
            return mx.maximum(counts, 1.0)
        return mx.maximum(parallel.global_sum(counts, self.group), 1.0) / self.group.size()

    def _across_ranks(self, total, ce, mtp_ce, aux, counts, grad_norm):
        """The step's numbers for the whole batch: losses averaged, expert counts summed over the ranks (so
        every rank moves the routing bias the same way)."""
        if self.group is None:
            return total, ce, mtp_ce, aux, counts, grad_norm
        n = self.group.size()
        total, ce, mtp_ce, aux = (parallel.global_sum(x, self.group) / n for x in (total, ce, mtp_ce, aux))
        return total, ce, mtp_ce, aux, parallel.global_sum(counts, self.group), grad_norm

    def eval_loss(self) -> dict:
        """Main and MTP cross-entropy on one fixed batch of the heldout split (same masking as training)."""
        if self._eval_batch is None:
            self._eval_batch = next(PackedBatches(
                self.tokenizer, self.cfg.batch_size, self.cfg.seq_len, "heldout", 12345, self.cfg.mask_prompt,
                self.cfg.task_options,
            ))
        ids, mask = (mx.array(a) for a in self._eval_batch)
        _, ce, mtp_ce, _, _ = self.loss(self.model, ids, mask)
        mx.eval(ce, mtp_ce)
        return {"eval_ce": ce.item(), "eval_mtp_ce": mtp_ce.item()}

    # ---- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        """checkpoints/step-NNNNNNN, written to a temporary folder and renamed; older ones pruned."""
        final = self.checkpoint_dir / f"step-{self.step:07d}"
        if not self.main:  # data parallelism: the ranks hold the same model; rank 0 writes it
            return final
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with atomic_folder(final) as tmp:
            self._write_model(tmp)
            (tmp / STATE_FILE).parent.mkdir()
            mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(self.optimizer.state)))
            state = {
                "step": self.step,
                "data": self.data.state(),
                "rng": {"seed": self.cfg.seed, "note": "the global RNG is reseeded from (seed, step) every step"},
                "train_config": asdict(self.cfg),
            }
            (tmp / STATE_FILE).write_text(json.dumps(state))
        for old in self.checkpoints()[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _write_model(self, folder: Path) -> None:
        """A checkpoint's model: the weights, or with adapters only the adapters."""
        if self.lora is not None:
            return lora.save_adapters(self.model, folder, self.lora)
        save_model(self.model, folder, self.args.to_dict())
        from .vocab import copy_tokenizer

        if self.tokenizer_dir is not None:
            copy_tokenizer(self.tokenizer_dir, folder)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoint_dir.exists():
            return []
        return sorted(p for p in self.checkpoint_dir.glob("step-*") if (p / STATE_FILE).exists())

    def resume(self, folder: Optional[Path] = None) -> bool:
        """Load model, optimizer, step, data position and RNG from a checkpoint (default: the newest).
        Returns False when there is none."""
        if folder is None:
            found = self.checkpoints()
            if not found:
                return False
            folder = found[-1]
        state = json.loads((folder / STATE_FILE).read_text())
        self._read_model(folder)
        opt = dict(mx.load(str(folder / OPTIMIZER_FILE)))
        self.optimizer.state = tree_unflatten(list(opt.items()))
        self.step = int(state["step"])
        self.data.load_state(state["data"])
        mx.eval(self.model.state, self.optimizer.state)
        self._step_fn = self._build_step()  # the compiled step captures the optimizer's state tree
        return True

    def _read_model(self, folder: Path) -> None:
        """The trained weights from a checkpoint folder (what `_write_model` wrote)."""
        if self.lora is not None:
            return self.model.load_weights(list(mx.load(str(folder / lora.ADAPTER_FILE)).items()), strict=False)
        from ..weights import read_weights

        self.model.load_weights(list(read_weights(folder, self.args, mx.float32).items()))

    def _truncate_metrics(self) -> None:
        """Drop metric lines past the resumed step (written by the run that was interrupted)."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= self.step]
        path.write_text("".join(line + "\n" for line in keep))

    def save_final(self) -> Path:
        """out/model: the trained model folder (no optimizer state; adapters fused in, float), written atomically;
        with adapters also out/adapters (for `mlx-deepseek fuse` onto another copy of the base). Rank 0 writes."""
        final = self.out / "model"
        if not self.main:
            return final
        if self.lora is not None:
            with atomic_folder(self.out / "adapters") as tmp:
                lora.save_adapters(self.model, tmp, self.lora)
                (tmp / "base_model.txt").write_text(str(self.base_path or ""))
            lora.fuse(self.model, dequantize=True)
            self.lora = None
        with atomic_folder(final) as tmp:
            self._write_model(tmp)
        return final

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> Path:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if resume and not self.resume():
            print(f"no checkpoint in {self.checkpoint_dir}; starting from step 0")
        if self.main:
            self._truncate_metrics()  # lines past the starting step belong to an abandoned run
            (self.out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (self.progress and self.main), unit="step",
                   dynamic_ncols=True)
        window: list[dict] = []
        counts = None
        t0, tokens = time.perf_counter(), 0
        with open(self.out / "metrics.jsonl" if self.main else os.devnull, "a") as metrics:
            while self.step < cfg.steps:
                ids, mask = next(self.data)  # the whole batch; with data parallelism each rank trains on its rows
                r = self.train_step(*parallel.shard_rows((ids, mask), self.group))
                tokens += ids.shape[0] * (ids.shape[1] - 1)
                counts = r["counts"] if counts is None else counts + r["counts"]
                window.append(r)
                bar.update(1)
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    dt = time.perf_counter() - t0
                    row = {
                        "step": self.step,
                        **{k: float(np.mean([w[k] for w in window])) for k in ("loss", "ce", "mtp_ce", "aux", "grad_norm")},
                        "lr": float(self.optimizer.learning_rate.item()),
                        "tokens_per_s": tokens / dt if dt > 0 else 0.0,
                        "tokens_seen": self.step * cfg.batch_size * cfg.seq_len,
                    }
                    if counts is not None and counts.size:
                        ratios = balance.load_ratio(counts)
                        row["load_max_mean"] = [round(x, 3) for x in ratios]
                        row["load_max_mean_worst"] = max(ratios)
                    if cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
                        row.update(self.eval_loss())
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{row['ce']:.3f}", mtp=f"{row['mtp_ce']:.3f}",
                                    tok_s=f"{row['tokens_per_s']:.0f}",
                                    load=f"{row.get('load_max_mean_worst', 0):.2f}")
                    window, counts = [], None
                    t0, tokens = time.perf_counter(), 0
                if self.step % cfg.save_every == 0 or last:
                    self.save_checkpoint()
        bar.close()
        return self.save_final()


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def nan_guard(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value}; lower the learning rate (--lr) or raise --warmup")
