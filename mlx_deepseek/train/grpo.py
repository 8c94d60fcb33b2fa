"""GRPO (DeepSeekMath §4.1, R1 §2.2): group rollouts, rule-based rewards, the clipped objective with a k3 KL.

The objective follows TRL's `GRPOTrainer` (1.16) formula for formula (tests/fixtures/make_grpo_reference.py
calls TRL's own code; tests/test_grpo.py checks loss and d loss / d logits for every loss type):

    logp_t      = log_softmax(logits_t / T)[y_t]          float32, the sampled tokens, the prompt as context
    A_i         = (r_i - mean(r_group)) / (std(r) + 1e-4) std per group ("group"), over the batch ("batch"), or
                                                           no division ("none"); std with Bessel's correction
    ratio_t     = exp(logp_t - logp_old_t)                 logp_old: with mu > 1, those of the batch's first
                                                           update (kept for the next ones); else logp itself
                                                           without gradient (ratio 1)
    l_t         = -min(ratio_t A_i, clip(ratio_t, 1 - eps, 1 + eps_high) A_i) + beta * kl_t
    kl_t        = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (k3; the reference is the base without adapters
                                                           (LoRA) or a frozen copy (full); beta = 0 skips it)
    grpo:    mean over sequences of (sum_t l_t / |o_i|)    bnpo, dapo: sum l_t / (completion tokens)
    dr_grpo: sum l_t / (sequences * max_completion_tokens)

A step: P prompts x G samples decoded together (`generate.batch_generate`; the G samples share their prompt's
prefill), rewards (`rewards.RewardSet`), advantages, optionally zero-variance groups replaced by fresh prompts
(DAPO's dynamic sampling), then mu optimizer updates on that rollout batch. `GRPOTrainer.compute_grads` is
the one place gradients are made (micro-batch by micro-batch, already normalised for the whole batch).
Data-parallel (`group=`, `train grpo --ranks N`): each rank rolls out its block of the step's prompts and the
averaged gradient equals one process's on all of them (DISTRIBUTED.md, "Data-parallel GRPO").

The run folder is that of `loop.Trainer` (whose checkpointing, resume and metrics it reuses): metrics.jsonl,
checkpoints/step-N (adapters or the full model, optimizer, state), model/ (LoRA: the adapters fused in, float)
and adapters/ (LoRA).
"""

from __future__ import annotations

import json
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from .. import parallel
from ..chat import apply_chat_template
from ..generate import Sampling, batch_generate
from ..loading import load_model, resolve
from ..models import fastmath
from ..weights import atomic_folder, save_model
from . import balance, lora, tasks
from .loop import STATE_FILE, TrainConfig, Trainer, load_for_training, nan_guard, run_folder, schedule
from .rewards import RewardSet, accuracy_reward, format_reward, language_reward

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_MODES = ("group", "batch", "none")


# ---- the objective --------------------------------------------------------------------------------
def completion_logps(logits: mx.array, ids: mx.array, temperature: float = 1.0) -> tuple[mx.array, mx.array]:
    """(log-probs of `ids`, entropy) per position, in float32, of logits[..., V] scaled by 1 / temperature.
    `logits[:, t]` must be the logits that predicted `ids[:, t]`."""
    logits = logits.astype(mx.float32) / temperature
    logz = fastmath.logsumexp(logits, axis=-1)
    logps = mx.take_along_axis(logits, ids[..., None], axis=-1)[..., 0] - logz
    p = fastmath.exp(logits - logz[..., None])  # the softmax, from logz (one exp over the vocabulary, not two)
    entropy = logz - (p * logits).sum(axis=-1)
    return logps, entropy


def group_advantages(rewards_per_func: np.ndarray, weights: np.ndarray, group_size: int, scale: str = "group"):
    """TRL's advantages: weighted nan-sum of the reward functions, minus the group's (nan-)mean, divided by
    std + 1e-4 (per group, over the batch, or not). Rows where every function is NaN get advantage 0.
    Returns (advantages [N], rewards [N] (NaN for those rows), zero-std flags [N])."""
    if scale not in SCALE_MODES:
        raise ValueError(f"scale_rewards={scale!r}: expected one of {SCALE_MODES}")
    r = np.asarray(rewards_per_func, dtype=np.float64)
    unscorable = np.isnan(r).all(axis=1)
    rewards = np.nansum(r * np.asarray(weights, dtype=np.float64)[None], axis=1)
    rewards[unscorable] = np.nan
    grouped = rewards.reshape(-1, group_size)
    with np.errstate(invalid="ignore", divide="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.repeat(np.nanmean(grouped, axis=1), group_size)
            if scale == "batch":
                std = np.full_like(rewards, _nanstd(rewards))
            else:
                std = np.repeat(_nanstd(grouped, axis=1) if group_size > 1 else np.zeros(len(grouped)), group_size)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    zero_std = np.isclose(std, 0.0, rtol=1.3e-6, atol=1e-5)  # torch.isclose's float32 defaults
    return np.nan_to_num(adv, nan=0.0).astype(np.float32), rewards.astype(np.float32), zero_std


def _nanstd(x: np.ndarray, axis=None) -> np.ndarray:
    """std ignoring NaNs, with Bessel's correction (NaN below two values), as TRL's nanstd."""
    n = np.sum(~np.isnan(x), axis=axis)
    var = np.nanmean((x - np.nanmean(x, axis=axis, keepdims=axis is not None)) ** 2, axis=axis)
    return np.sqrt(np.where(n > 1, var * n / np.maximum(n - 1, 1), np.nan))


def policy_loss(
    logps: mx.array,
    mask: mx.array,
    advantages: mx.array,
    old_logps: Optional[mx.array] = None,
    ref_logps: Optional[mx.array] = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    loss_type: str = "dapo",
    n_sequences: Optional[int] = None,
    n_tokens: Optional[float] = None,
    max_completion_length: Optional[int] = None,
    entropy: Optional[mx.array] = None,
) -> tuple[mx.array, dict]:
    """The GRPO loss of a batch [B, C] (or, with the n_* totals of the whole batch, a micro-batch's share of
    it: shares add up to the batch's loss). Returns (loss, sums of the masked per-token statistics)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.astype(mx.float32)
    adv = advantages.astype(mx.float32)[:, None]
    old = mx.stop_gradient(logps) if old_logps is None else old_logps
    coef_1 = mx.exp(logps - old)
    coef_2 = mx.clip(coef_1, 1 - epsilon, 1 + eps_high)
    per_token = -mx.minimum(coef_1 * adv, coef_2 * adv)
    kl = None
    if beta != 0.0:
        d = ref_logps - logps
        kl = mx.exp(d) - d - 1
        per_token = per_token + beta * kl
    per_token = mx.where(mask > 0, per_token, 0.0)
    n_seq = logps.shape[0] if n_sequences is None else n_sequences
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / mx.maximum(mask.sum(-1), 1.0)).sum() / n_seq
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (n_seq * (max_completion_length or logps.shape[1]))
    else:  # bnpo and dapo: one batch, no accumulation, one process -> the same normaliser
        tokens = mask.sum() if n_tokens is None else n_tokens
        loss = per_token.sum() / mx.maximum(tokens, 1.0)
    low = (coef_1 < 1 - epsilon) & (adv < 0)
    high = (coef_1 > 1 + eps_high) & (adv > 0)
    stats = {
        "tokens": mask.sum(),
        "clip_low": (low * mask).sum(), "clip_high": (high * mask).sum(), "clip_region": ((low | high) * mask).sum(),
    }
    if kl is not None:
        stats["kl"] = mx.where(mask > 0, kl, 0.0).sum()
    if entropy is not None:
        stats["entropy"] = mx.stop_gradient(mx.where(mask > 0, entropy, 0.0)).sum()
    return loss, {k: mx.stop_gradient(v) for k, v in stats.items()}


# ---- configuration -------------------------------------------------------------------------------
@dataclass
class GRPOConfig:
    """A GRPO run. `steps` counts rollout batches; each makes `mu` optimizer updates."""

    steps: int = 100
    prompts_per_step: int = 4
    group_size: int = 8  # G
    max_completion_tokens: int = 256
    micro_batch_tokens: int = 4096  # padded tokens of a forward/backward pass (rows of like length go together)
    temperature: float = 1.0
    top_p: float = 1.0
    loss_type: str = "dapo"  # TRL's default
    scale_rewards: str = "group"
    beta: float = 0.0  # KL weight (TRL's default 0; R1 / DeepSeekMath used 0.04)
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None  # DAPO's clip-higher (0.28); None: = epsilon
    mu: int = 1  # optimizer updates per rollout batch (TRL's num_iterations)
    mask_truncated: bool = False  # completions cut at max_completion_tokens get no loss
    resample_zero_std: int = 0  # rounds of fresh prompts replacing groups whose rewards all agree
    skip_settled: int = 0  # DifficultyFilter's patience (0: off)
    lr: float = 1e-4
    min_lr_ratio: float = 1.0  # constant after warmup unless < 1 (cosine)
    warmup: int = 0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.99)
    grad_clip: float = 1.0
    finetune: str = "lora"  # or "full"
    lora: dict = field(default_factory=dict)  # LoraSettings fields
    dequantize: bool = True  # train on float32 weights (CPU matmuls); False: LoRA on the quantized base
    bias_gamma: float = 0.0  # the router correction bias is frozen; > 0 moves it by the load (V3's update)
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.2, "language": 0.1})
    reward_file: Optional[str] = None
    task: Optional[str] = "arithmetic"  # or None with `data`
    data: Optional[str] = None  # a JSONL file: prompt, answer (+ lang, anything the rewards read)
    split: str = "train"
    task_options: dict = field(default_factory=dict)  # kinds / langs / levels for tasks.example_at
    data_seed: int = 1
    seed: int = 0
    eval_every: int = 0  # held-out evaluation every N steps (0: never)
    eval_split: str = "hard"
    eval_data: Optional[str] = None
    eval_n: int = 64
    eval_max_tokens: int = 256
    log_every: int = 1
    save_every: int = 10
    keep_checkpoints: int = 2
    max_minutes: float = 0.0  # stop (checkpoint, final model) after the step that passes this wall time (0: no limit)

    from_dict = classmethod(TrainConfig.from_dict.__func__)  # the loop's: unknown names refused, betas a tuple

    def check(self) -> None:
        for name in ("steps", "prompts_per_step", "max_completion_tokens", "micro_batch_tokens", "mu", "log_every",
                     "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.skip_settled < 0 or self.skip_settled == 1:
            raise ValueError(f"skip_settled={self.skip_settled}: 0 (off) or at least 2 (1 would never skip a prompt)")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: GRPO needs at least 2 samples per prompt")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}: expected one of {LOSS_TYPES}")
        if self.scale_rewards not in SCALE_MODES:
            raise ValueError(f"scale_rewards={self.scale_rewards!r}: expected one of {SCALE_MODES}")
        if self.finetune not in ("lora", "dora", "full"):
            raise ValueError(f"finetune={self.finetune!r}: expected lora, dora or full")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive (the log-probs are scaled by it)")
        if (self.task is None) == (self.data is None):
            raise ValueError("give exactly one prompt source: a task (--task arithmetic) or a JSONL file (--data)")
        if self.task_options.get("beyond") and self.split != "train":
            raise ValueError(f"beyond with split={self.split!r}: only train-side prompts go beyond the training "
                             "levels (drop --split or --beyond)")

    @property
    def lora_settings(self) -> Optional[lora.LoraSettings]:
        return lora.LoraSettings.for_finetune(self.finetune, self.lora)


# ---- prompts ----------------------------------------------------------------------------------------
def read_jsonl(path: Union[str, Path]) -> list[dict]:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if "prompt" not in row or "answer" not in row:
                raise ValueError(f"{path}:{i}: each row needs 'prompt' and 'answer'")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def task_row(example: tasks.Example) -> dict:
    p = example.problem
    return {"prompt": example.prompt, "answer": example.value, "lang": example.lang, "kind": p.kind,
            "level": p.level, "key": p.key, "bucket": f"{p.kind}{p.level}"}


class PromptStream:
    """Rows (prompt, answer, ...) by position: task problems, or a JSONL file reshuffled every epoch. Its
    state is one integer."""

    def __init__(self, task: Optional[str], data: Optional[str], split: str = "train", seed: int = 0,
                 task_options: Optional[dict] = None):
        if task is not None and task not in ("arithmetic",):
            raise ValueError(f"task={task!r}: expected 'arithmetic'")
        self.task, self.split, self.seed = task, split, seed
        self.task_options = dict(task_options or {})
        self.rows = read_jsonl(data) if data else None
        self.position = 0

    def row_at(self, i: int) -> dict:
        if self.rows is None:  # task option "beyond": the share of prompts beyond the training levels (True: all)
            options = dict(self.task_options)
            share = float(options.pop("beyond", 0.0))
            return task_row(tasks.mixed_example_at(i, self.split, self.seed, share, **options))
        epoch, k = divmod(i, len(self.rows))
        order = list(range(len(self.rows)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return self.rows[order[k]]

    def take(self, n: int) -> list[dict]:
        out = [self.row_at(self.position + k) for k in range(n)]
        self.position += n
        return out

    def state(self) -> dict:
        return {"position": self.position}

    def load_state(self, state: dict) -> None:
        self.position = int(state["position"])


class DifficultyFilter:
    """Online difficulty filtering: prompts of a settled bucket are skipped before any rollout.

    A row's bucket is its `bucket` field (the task's kind and level; rows without one are never skipped). A bucket
    is settled once `patience` of its groups in a row had rewards that all agreed (all solved or all failed: no
    advantage, no gradient). Of a settled bucket's prompts one in `patience` still goes out as a probe, so a bucket
    that starts to vary again comes back. Its state is a few integers per bucket, saved with the checkpoint."""

    def __init__(self, patience: int):
        self.patience = patience
        self.agreeing: dict[str, int] = {}  # bucket -> its last groups with agreeing rewards, in a row
        self.passed_over: dict[str, int] = {}  # bucket -> its prompts skipped since its last probe
        self.skipped = 0  # prompts skipped since the last `take_skipped`

    def admits(self, row: dict) -> bool:
        """Whether this row goes out (called once per row, in stream order)."""
        bucket = row.get("bucket")
        if not self.patience or bucket is None or self.agreeing.get(bucket, 0) < self.patience:
            return True
        passed = self.passed_over.get(bucket, 0) + 1
        self.passed_over[bucket] = passed % self.patience
        self.skipped += passed < self.patience
        return passed == self.patience

    def record(self, rows: list[dict], agreed) -> None:
        """Each rolled-out row's outcome: whether its group's rewards all agreed."""
        for row, same in zip(rows, agreed):
            bucket = row.get("bucket")
            if bucket is not None:
                self.agreeing[bucket] = self.agreeing.get(bucket, 0) + 1 if same else 0

    def take_skipped(self) -> int:
        n, self.skipped = self.skipped, 0
        return n

    def state(self) -> dict:
        return {"agreeing": self.agreeing, "passed_over": self.passed_over}

    def load_state(self, state: dict) -> None:
        self.agreeing, self.passed_over = dict(state["agreeing"]), dict(state["passed_over"])


def prompt_text(tokenizer, model, row: dict) -> str:
    messages = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
    return apply_chat_template(tokenizer, messages, model.args.model_type)


# ---- rollouts ---------------------------------------------------------------------------------------
@dataclass
class Group:
    """One prompt's G completions and their rewards."""

    row: dict
    prompt_ids: list[int]
    completions: list[list[int]]  # token ids, EOS included when the sample ended with it
    texts: list[str]
    truncated: list[bool]
    rewards: np.ndarray  # [G, F]


def rollout(model, tokenizer, rows: list[dict], cfg: GRPOConfig, reward_set: RewardSet) -> tuple[list[Group], dict]:
    """G samples per prompt, decoded in one batch (each prompt prefilled once), and their rewards."""
    texts = [prompt_text(tokenizer, model, r) for r in rows]
    tic = time.perf_counter()
    results = batch_generate(model, tokenizer, texts, n=cfg.group_size, max_tokens=cfg.max_completion_tokens,
                             sampling=Sampling(temperature=cfg.temperature, top_p=cfg.top_p))
    elapsed = time.perf_counter() - tic
    eos = tokenizer.eos_token_id
    groups = []
    for p, (row, text) in enumerate(zip(rows, texts)):
        rs = results[p * cfg.group_size:(p + 1) * cfg.group_size]
        examples = [{**row, "prompt_text": text}] * len(rs)
        groups.append(Group(
            row=row, prompt_ids=tokenizer.encode(text, add_special_tokens=False),
            completions=[r.tokens + ([eos] if r.finish_reason == "stop" else []) for r in rs],
            texts=[r.text for r in rs], truncated=[r.finish_reason == "length" for r in rs],
            rewards=reward_set.score([r.text for r in rs], examples),
        ))
    tokens = sum(len(r.tokens) for r in results)
    return groups, {"gen_tokens": tokens, "gen_seconds": elapsed}


@dataclass
class RolloutBatch:
    groups: list[Group]
    advantages: np.ndarray  # [P * G]
    rewards: np.ndarray  # [P * G, F]
    total: np.ndarray  # [P * G] weighted
    zero_std_frac: float
    gen_tokens: int
    gen_seconds: float
    micro: list = field(default_factory=list)  # the MicroBatches of the forward passes (`prepare`)
    old_logps: list = field(default_factory=list)  # per micro-batch [B, C] (mu > 1: kept by the first update)
    ref_logps: list = field(default_factory=list)  # per micro-batch [B, C] (beta != 0)
    drawn: Optional[np.ndarray] = None  # [all rollouts drawn, F]: with resampling, more rows than `rewards`

    @property
    def n_sequences(self) -> int:
        return len(self.advantages)


@dataclass
class MicroBatch:
    """Rows of a rollout batch that one forward (and backward) pass takes together: each row its prompt and its
    completion but the last token, right-padded (causal attention: padding after a row changes nothing before)."""

    rows: np.ndarray  # the rows' places in the batch (advantages' order)
    inputs: mx.array  # [B, W]
    tokens: mx.array  # [B, W] 1 where `inputs` holds a token, 0 on padding
    ids: mx.array  # [B, C] completion tokens, right-padded
    mask: mx.array  # [B, C]
    positions: mx.array  # [B, C] the input position whose output predicts each completion token


def micro_batches(groups: list[Group], max_tokens: int) -> list[MicroBatch]:
    """The batch's rows sorted by length and cut into micro-batches of at most `max_tokens` padded tokens (a
    longer row goes alone). Rows of one length go together, so padding (and attention's quadratic cost over it,
    which a group's one long completion used to impose on all G rows) is small."""
    seqs = [(g.prompt_ids, c) for g in groups for c in g.completions]
    widths = [len(prompt) + len(completion) - 1 for prompt, completion in seqs]  # a row's input length
    chunks, current = [], []
    for i in sorted(range(len(seqs)), key=widths.__getitem__):  # each row the longest of its chunk so far
        if current and (len(current) + 1) * widths[i] > max_tokens:
            chunks.append(current)
            current = []
        current.append(i)
    chunks.append(current)
    out = []
    for rows in chunks:
        width = widths[rows[-1]]
        span = max(len(seqs[i][1]) for i in rows) or 1
        inputs = np.zeros((len(rows), width), dtype=np.int32)
        tokens = np.zeros_like(inputs)
        ids, mask, positions = (np.zeros((len(rows), span), dtype=np.int32) for _ in range(3))
        for b, i in enumerate(rows):
            prompt, completion = seqs[i]
            full = list(prompt) + list(completion[:-1])
            inputs[b, : len(full)] = full
            tokens[b, : len(full)] = 1
            ids[b, : len(completion)] = completion
            mask[b, : len(completion)] = 1
            positions[b] = np.minimum(len(prompt) - 1 + np.arange(span), width - 1)
        out.append(MicroBatch(np.array(rows), mx.array(inputs), mx.array(tokens), mx.array(ids), mx.array(mask),
                              mx.array(positions)))
    return out


# ---- the trainer --------------------------------------------------------------------------------------
class GRPOTrainer(Trainer):
    """GRPO on a model (LoRA/DoRA adapters or all weights). Reuses `loop.Trainer`'s checkpoints (atomic,
    pruned), resume, metrics truncation and final save; the step is GRPO's."""

    def __init__(self, model, tokenizer, cfg: GRPOConfig, out: Union[str, Path], progress: bool = True,
                 tokenizer_dir: Optional[Path] = None, ref_model=None, group: Optional[mx.distributed.Group] = None,
                 base_path: Optional[Path] = None):
        """group: data parallelism over its ranks. `prompts_per_step` stays the GLOBAL number of prompts: rank r
        rolls out the r-th contiguous block of each step's prompts (the ones one process would take), with its
        own sampling seed; rank 0 writes (see DISTRIBUTED.md)."""
        cfg.check()
        self.group = parallel.active(group)
        self.main = self.group is None or self.group.rank() == 0
        if self.group is not None and cfg.prompts_per_step % self.group.size():
            raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the {self.group.size()} "
                             "ranks (it counts the prompts of all ranks together)")
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        self.base_path = base_path
        self.out, self.progress = Path(out), progress
        self.args = model.args
        self.n_experts = self.args.n_routed_experts or 0
        self.moe = balance.moe_layers(model)
        self._adapt(model, cfg.lora_settings, cfg.seed)
        balance.freeze_bias(model)
        if self.lora is None:  # full fine-tuning: the MTP module gets no gradient from GRPO; keep it fixed
            for m in model.mtp:
                m.freeze()
        self.ref_model = ref_model
        if cfg.beta != 0.0 and self.lora is None and ref_model is None:
            raise ValueError("full fine-tuning with beta != 0 needs a frozen reference model (ref_model)")
        self.trace = balance.attach(model) if self.moe else None
        model.train()
        sched = SimpleNamespace(lr=cfg.lr, warmup=cfg.warmup, steps=cfg.steps * cfg.mu, min_lr_ratio=cfg.min_lr_ratio)
        self.optimizer = optim.AdamW(learning_rate=schedule(sched), betas=list(cfg.betas), weight_decay=cfg.weight_decay)
        self.optimizer.init(model.trainable_parameters())
        self.reward_set = RewardSet.build(cfg.rewards, cfg.reward_file)
        self.data = PromptStream(cfg.task, cfg.data, cfg.split, cfg.data_seed, cfg.task_options)
        self.filter = DifficultyFilter(cfg.skip_settled)
        self.step = 0
        self._eval_rows = None

    # ---- one rollout batch -----------------------------------------------------------------------
    def make_batch(self) -> RolloutBatch:
        """Rollouts of the next prompts; with resample_zero_std, groups whose rewards all agree are replaced by
        fresh prompts' groups (up to that many rounds; left in, they only carry zero advantage). With data
        parallelism each rank rolls out its block of the prompts (`_rollout_own`) and keeps prompts_per_step / ranks
        groups; "batch" reward scaling uses the std over every rank's rewards (gathered: exactly one process's)."""
        cfg = self.cfg
        weights = self.reward_set.weight_vector
        ranks = 1 if self.group is None else self.group.size()
        per_rank = cfg.prompts_per_step // ranks
        groups, info, first_zero = self._rollout_own([per_rank] * ranks)
        zero_frac = float(np.mean(parallel.gather_rows(first_zero, self.group)))
        drawn = [g.rewards for g in groups]  # every rollout, the replaced groups' too (unbiased reward means)
        for _ in range(cfg.resample_zero_std):
            zero = self._zero_std(groups, weights)
            wanted = parallel.gather_rows([zero.sum()], self.group).astype(int)  # every rank's zero-std groups
            if not wanted.any():
                break
            fresh, more, fresh_zero = self._rollout_own(wanted)
            info = {k: info[k] + more[k] for k in info}
            drawn += [g.rewards for g in fresh]
            kept = [g for g, z in zip(groups, zero) if not z] + [g for g, z in zip(fresh, fresh_zero) if not z]
            spare = [g for g, z in zip(groups, zero) if z] + [g for g, z in zip(fresh, fresh_zero) if z]
            groups = (kept + spare)[:per_rank]
        table = np.concatenate([g.rewards for g in groups])
        if cfg.scale_rewards == "batch" and self.group is not None:  # the std of the whole step's rewards
            everyone = parallel.gather_rows(table, self.group)
            adv, total, _ = group_advantages(everyone, weights, cfg.group_size, cfg.scale_rewards)
            mine = parallel.rank_block(len(everyone), self.group)
            adv, total = adv[mine], total[mine]
        else:
            adv, total, _ = group_advantages(table, weights, cfg.group_size, cfg.scale_rewards)
        if cfg.mask_truncated:
            truncated = np.concatenate([g.truncated for g in groups])
            adv = np.where(truncated, 0.0, adv).astype(np.float32)
        return RolloutBatch(groups, adv, table, total, zero_frac, info["gen_tokens"], info["gen_seconds"],
                            drawn=np.concatenate(drawn))

    def _rollout_own(self, counts) -> tuple[list[Group], dict, np.ndarray]:
        """Rollouts of this rank's rows of the next sum(counts) admitted prompts of the stream: the r-th contiguous
        block, counts[r] rows long (one process: the next counts[0]), and whether each group's rewards all agree.
        Every rank's stream moves past all of them, and with the difficulty filter on, every rank's filter learns
        every rank's outcomes."""
        r = 0 if self.group is None else self.group.rank()
        counts = [int(c) for c in counts]
        rows = []
        while len(rows) < sum(counts):
            row = self.data.row_at(self.data.position)
            self.data.position += 1
            if self.filter.admits(row):
                rows.append(row)
        mine = rows[sum(counts[:r]):sum(counts[: r + 1])]
        groups, info, zero = [], {"gen_tokens": 0, "gen_seconds": 0.0}, np.zeros(0, bool)
        if mine:
            with self.sampling_model() as model:
                groups, info = rollout(model, self.tokenizer, mine, self.cfg, self.reward_set)
            zero = self._zero_std(groups, self.reward_set.weight_vector)
        if self.filter.patience:
            width = max(counts)
            agreed = np.full(width, np.nan)
            agreed[: len(zero)] = zero
            everyone = parallel.gather_rows(agreed, self.group).reshape(-1, width)
            self.filter.record(rows, [a for block, n in zip(everyone, counts) for a in block[:n]])
        return groups, info, zero

    def _zero_std(self, groups: list[Group], weights: np.ndarray) -> np.ndarray:
        table = np.concatenate([g.rewards for g in groups])
        _, _, zero = group_advantages(table, weights, self.cfg.group_size, "group")
        return zero.reshape(-1, self.cfg.group_size)[:, 0]

    # ---- forward passes ------------------------------------------------------------------------------
    def micro_logps(self, model, mb: MicroBatch) -> tuple[mx.array, mx.array]:
        """Temperature-scaled log-probs and entropies [B, C] of a micro-batch's completion tokens, each row's
        prompt as its context."""
        hidden = mx.take_along_axis(model.model(mb.inputs), mb.positions[..., None], axis=1)
        return completion_logps(model.logits(hidden), mb.ids, self.cfg.temperature)

    def prepare(self, batch: RolloutBatch) -> None:
        """The batch's micro-batches and, with beta != 0, its reference log-probs (no gradient). (The old
        log-probs of mu > 1 are those of the first update's forward pass: `compute_grads` keeps them.)"""
        cfg = self.cfg
        batch.micro = micro_batches(batch.groups, cfg.micro_batch_tokens)
        if cfg.beta != 0.0:
            if self.lora is not None:
                with lora.adapters_disabled(self.model):
                    batch.ref_logps = [self.micro_logps(self.model, mb)[0] for mb in batch.micro]
                    mx.eval(batch.ref_logps)
            else:
                batch.ref_logps = [self.micro_logps(self.ref_model, mb)[0] for mb in batch.micro]
                mx.eval(batch.ref_logps)
        if self.trace is not None:
            self.trace.clear()

    def _micro_loss(self, model, batch: RolloutBatch, k: int, n_tokens: float, max_len: int, n_sequences: float):
        cfg, mb = self.cfg, batch.micro[k]
        if self.trace is not None:
            self.trace.clear()
        logps, entropy = self.micro_logps(model, mb)
        loss, stats = policy_loss(
            logps, mb.mask, mx.array(batch.advantages[mb.rows]),
            old_logps=batch.old_logps[k] if batch.old_logps else None,
            ref_logps=batch.ref_logps[k] if batch.ref_logps else None,
            beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
            n_sequences=n_sequences, n_tokens=n_tokens, max_completion_length=max_len, entropy=entropy,
        )
        counts = mx.zeros((0, 1))
        if self.trace is not None:
            counts = balance.layer_counts(self.trace, self.n_experts, [m.layer for m in self.moe], mb.tokens)
        return loss, stats, counts, mx.stop_gradient(logps)

    def compute_grads(self, batch: RolloutBatch) -> tuple[dict, dict]:
        """THE gradient of the GRPO loss of one rollout batch w.r.t. the trainable parameters (summed over the
        micro-batches, each already normalised for the whole batch), and the step's statistics.
        Data-parallel training averages here: the normalisers (completion tokens, sequences) are each rank's share
        (1 / ranks) of the global ones, so the mean of the ranks' gradients is one process's gradient on all the
        ranks' rollouts; loss, statistics and expert counts are those of the whole step on every rank.
        With mu > 1 the first call (no old log-probs yet: the ratio is 1, as it is with mu = 1) stores the
        log-probs it computed as the batch's old log-probs for the updates after it."""
        n_tokens, n_sequences = self._normalisers(batch)
        max_len = self.cfg.max_completion_tokens
        loss_and_grad = nn.value_and_grad(self.model, self._micro_loss)
        grads, loss, sums, counts = None, 0.0, {}, None
        keep_old = self.cfg.mu > 1 and not batch.old_logps
        old = []
        for k in range(len(batch.micro)):
            (l, stats, c, logps), g = loss_and_grad(self.model, batch, k, n_tokens, max_len, n_sequences)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(grads, l, stats, c, logps)
            if keep_old:
                old.append(logps)
            loss += l.item()
            for name, v in stats.items():
                sums[name] = sums.get(name, 0.0) + v.item()
            counts = np.array(c) if counts is None else counts + np.array(c)
        grads = parallel.average_gradients(grads, self.group)  # data parallelism (a group of >1 ranks)
        if self.group is not None:  # the whole step's numbers: sums and counts added, the loss shares averaged
            names = sorted(sums)
            added = np.array(parallel.global_sum(mx.array([loss / self.group.size()] + [sums[n] for n in names]), self.group))
            loss, sums = float(added[0]), dict(zip(names, added[1:].tolist()))
            if counts is not None and counts.size:
                counts = np.array(parallel.global_sum(mx.array(counts), self.group))
        if keep_old:
            batch.old_logps = old
        tokens = max(sums.pop("tokens"), 1.0)
        out = {"loss": loss, **{k: v / tokens for k, v in sums.items()}}
        if counts is not None and counts.size:
            out["counts"] = counts
        return grads, out

    def _normalisers(self, batch: RolloutBatch) -> tuple[float, float]:
        """(completion tokens, sequences) that the loss divides by: the batch's, or with data parallelism this
        rank's share (1 / ranks) of the sums over all ranks."""
        n = [float(sum(len(c) for g in batch.groups for c in g.completions)), float(batch.n_sequences)]
        if self.group is None:
            return n[0], n[1]
        tokens, sequences = np.array(parallel.global_sum(mx.array(n), self.group)).tolist()
        return tokens / self.group.size(), sequences / self.group.size()

    # ---- the step -----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """Rollouts, rewards, advantages, then mu optimizer updates. The global RNG is reseeded from (seed,
        step, rank) first, so a resumed run samples exactly what an uninterrupted one does, and with data
        parallelism each rank samples differently (rank 0 as one process would)."""
        cfg = self.cfg
        rank = 0 if self.group is None else self.group.rank()
        mx.random.seed((cfg.seed * 1_000_003 + self.step + rank * 7_919_000_009) % 2**32)
        tic = time.perf_counter()
        batch = self.make_batch()
        self.prepare(batch)
        updates = []
        for _ in range(cfg.mu):
            grads, stats = self.compute_grads(batch)
            grads, grad_norm = optim.clip_grad_norm(grads, cfg.grad_clip)
            self.optimizer.update(self.model, grads)
            mx.eval(self.model.parameters(), self.optimizer.state, grad_norm)
            stats["grad_norm"] = grad_norm.item()
            nan_guard(stats["loss"], f"the GRPO loss at step {self.step + 1}")
            updates.append(stats)
        counts = updates[0].get("counts")
        if cfg.bias_gamma and counts is not None:
            balance.update_bias(self.model, mx.array(counts), cfg.bias_gamma)
        self.step += 1
        return self._step_metrics(batch, updates, time.perf_counter() - tic)

    def _step_metrics(self, batch: RolloutBatch, updates: list[dict], seconds: float) -> dict:
        """The step's numbers; with data parallelism those of every rank's rollouts together (reward_errors: this
        rank's)."""
        lengths = [len(c) for g in batch.groups for c in g.completions]
        truncated = [t for g in batch.groups for t in g.truncated]
        total, rewards, gen_tokens, gen_seconds = batch.total, batch.rewards, batch.gen_tokens, batch.gen_seconds
        if self.group is not None:
            total, rewards, lengths, truncated = (parallel.gather_rows(x, self.group) for x in (total, rewards, lengths, truncated))
            gen = parallel.gather_rows([[gen_tokens, gen_seconds]], self.group)
            gen_tokens, gen_seconds = gen[:, 0].sum(), gen[:, 1].max()  # the ranks generate at the same time
        row = {"step": self.step, "reward": float(np.nanmean(total)), "reward_std": float(_nanstd(total))}
        for j, name in enumerate(self.reward_set.names):
            row[f"rewards/{name}"] = float(np.nanmean(rewards[:, j])) if not np.isnan(rewards[:, j]).all() else float("nan")
        if "accuracy" in self.reward_set.names:
            row["accuracy"] = row["rewards/accuracy"]
            if self.cfg.resample_zero_std and batch.drawn is not None:  # every rank alike (a collective below)
                drawn = batch.drawn[:, self.reward_set.names.index("accuracy")]
                replaced = len(batch.drawn) > len(batch.rewards)  # zero-std groups were replaced (on this rank)
                sums = parallel.gather_rows([[np.nansum(drawn), np.sum(~np.isnan(drawn)), replaced]], self.group).sum(axis=0)
                if sums[2]:
                    row["accuracy_drawn"] = float(sums[0] / max(sums[1], 1))  # every rollout drawn, replaced ones too
        for key in ("loss", "grad_norm", "entropy", "kl", "clip_low", "clip_high", "clip_region"):
            if key in updates[0]:
                row[key] = float(np.mean([u[key] for u in updates]))
        row.update({
            "completion_length": float(np.mean(lengths)), "truncation": float(np.mean(truncated)),
            "zero_std_frac": batch.zero_std_frac,
            **({"skipped": self.filter.take_skipped()} if self.filter.patience else {}),
            "lr": float(self.optimizer.learning_rate.item()),
            "gen_tokens_per_s": float(gen_tokens / max(gen_seconds, 1e-9)), "rollout_seconds": float(gen_seconds),
            "step_seconds": seconds,
            "reward_errors": dict(self.reward_set.errors),
        })
        if "counts" in updates[0]:
            ratios = balance.load_ratio(updates[0]["counts"])
            row["load_max_mean"] = [round(x, 3) for x in ratios]
            row["load_max_mean_worst"] = max(ratios)
        return row

    # ---- held-out evaluation ---------------------------------------------------------------------------
    def eval_rows(self) -> list[dict]:
        if self._eval_rows is None:
            cfg = self.cfg
            if cfg.eval_data:
                self._eval_rows = read_jsonl(cfg.eval_data)[: cfg.eval_n]
            else:
                self._eval_rows = [task_row(ex) for ex in tasks.generate(cfg.eval_n, split=cfg.eval_split, seed=12345)]
        return self._eval_rows

    def evaluate(self) -> dict:
        """Greedy answers to the held-out rows: accuracy, format, language (the built-in rewards' means)."""
        with self.sampling_model() as model:
            return evaluate_rows(model, self.tokenizer, self.eval_rows(), self.cfg.eval_max_tokens)

    def sampling_model(self):
        """The policy as rollouts and evaluations sample it: with LoRA, the adapters merged into float weights
        (`lora.adapters_merged`: a third of the projections' matmuls; the same function up to rounding)."""
        return lora.adapters_merged(self.model) if self.lora is not None else nullcontext(self.model)

    # ---- checkpoints (the loop's, adapters included) ---------------------------------------------------------
    def _build_step(self):
        return None  # GRPO's step is train_step (not one compiled graph); the loop's resume rebuilds with this

    def resume(self, folder: Optional[Path] = None) -> bool:
        folder = folder or (self.checkpoints() or [None])[-1]
        if folder is None or not super().resume(folder):
            return False
        state = json.loads((folder / STATE_FILE).read_text())
        self.reward_set.errors = dict(state.get("reward_errors", {}))
        if "difficulty" in state:
            self.filter.load_state(state["difficulty"])
        return True

    def save_checkpoint(self) -> Path:
        path = super().save_checkpoint()
        if not self.main:  # data parallelism: rank 0 writes
            return path
        state = json.loads((path / STATE_FILE).read_text())  # the loop's state, the reward errors, the filter
        state["reward_errors"] = self.reward_set.errors
        state["difficulty"] = self.filter.state()
        (path / STATE_FILE).write_text(json.dumps(state))
        return path

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> Path:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if resume and not self.resume() and self.main:
            print(f"no checkpoint in {self.checkpoint_dir}; starting from step 0")
        if self.main:  # data parallelism: rank 0 writes, and evaluates (greedy: the same on every rank)
            self._truncate_metrics()
            (self.out / "grpo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (self.progress and self.main), unit="step",
                   dynamic_ncols=True)
        started = time.perf_counter()
        evaluate = bool(cfg.eval_every) and self.main
        with open(self.out / "metrics.jsonl" if self.main else os.devnull, "a") as metrics:
            if evaluate and self.step == 0:
                metrics.write(json.dumps({"step": 0, **{f"eval_{k}": v for k, v in self.evaluate().items()}}) + "\n")
            while self.step < cfg.steps:
                row = self.train_step()
                bar.update(1)
                late = float(time.perf_counter() - started > 60 * cfg.max_minutes)
                out_of_time = bool(cfg.max_minutes) and parallel.global_sum(mx.array(late), self.group).item() > 0  # any rank
                last = self.step == cfg.steps or out_of_time
                row["minutes"] = (time.perf_counter() - started) / 60
                if evaluate and (self.step % cfg.eval_every == 0 or last):
                    row.update({f"eval_{k}": v for k, v in self.evaluate().items()})
                if self.step % cfg.log_every == 0 or last or "eval_accuracy" in row:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row.get('accuracy', float('nan')):.2f}",
                                len=f"{row['completion_length']:.0f}", **({"eval": f"{row['eval_accuracy']:.2f}"}
                                                                            if "eval_accuracy" in row else {}))
                if self.step % cfg.save_every == 0 or last:
                    self.save_checkpoint()
                if out_of_time:
                    if self.main:
                        print(f"stopping after step {self.step}: the {cfg.max_minutes}-minute limit has passed")
                    break
        bar.close()
        return self.save_final()


def evaluate_rows(model, tokenizer, rows: list[dict], max_tokens: int = 256, batch_size: int = 64) -> dict:
    """Greedy completions of rows: mean accuracy, format and language rewards."""
    scores = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        texts = [prompt_text(tokenizer, model, r) for r in chunk]
        results = batch_generate(model, tokenizer, texts, max_tokens=max_tokens)
        for r, text, res in zip(chunk, texts, results):
            ex = {**r, "prompt_text": text}
            scores.append([accuracy_reward(res.text, ex), format_reward(res.text, ex), language_reward(res.text, ex)])
    s = np.array(scores)
    return {"accuracy": float(s[:, 0].mean()), "format": float(s[:, 1].mean()), "language": float(s[:, 2].mean()),
            "n": len(rows)}


# ---- loading and the entry point ----------------------------------------------------------------------
def grpo(model_path, out: Union[str, Path], cfg: Optional[GRPOConfig] = None, resume: bool = False,
         progress: bool = True) -> Path:
    """GRPO-train the model at `model_path` (None: the bundled nano-r1) into `out`; returns out/model. Started by
    mlx.launch (`train grpo --ranks N | --hostfile H`), data-parallel over the ranks."""
    cfg = cfg or GRPOConfig()
    cfg.check()
    out = run_folder(out, resume)
    if cfg.finetune == "full" and cfg.dequantize is False:
        raise ValueError("full fine-tuning needs float weights (leave dequantize on)")
    model, tok, folder = load_for_training(model_path, cfg.dequantize)
    ref = None
    if cfg.finetune == "full" and cfg.beta != 0.0:
        ref, _, _ = load_for_training(folder, True)
        ref.freeze()
    group = parallel.active(mx.distributed.init())  # data parallelism when started by mlx.launch
    trainer = GRPOTrainer(model, tok, cfg, out, progress=progress, tokenizer_dir=folder, ref_model=ref, group=group,
                          base_path=folder)
    return trainer.run(resume=resume)


def fuse_adapters(base, adapters: Union[str, Path], out: Union[str, Path], dequantize: bool = False) -> Path:
    """`mlx-deepseek fuse`: the base model (as stored: quantized or float) with the adapters folded in, as a
    model folder (quantized like the base unless `dequantize`)."""
    from .vocab import copy_tokenizer

    folder = resolve(base)
    model = load_model(folder)
    lora.load_adapters(model, Path(adapters))
    lora.fuse(model, dequantize=dequantize)
    if dequantize:
        lora.dequantize(model)
    with atomic_folder(Path(out)) as tmp:
        save_model(model, tmp, model.args.to_dict())
        copy_tokenizer(folder, tmp)
    return Path(out)


def rollout_speed(model, tokenizer, n_prompts: int = 4, group_size: int = 8, max_tokens: int = 128,
                  temperature: float = 1.0, split: str = "hard", seed: int = 7) -> dict:
    """Tokens/s of GRPO's batched group rollouts (P prompts x G samples in one batch) against generating the
    same number of samples one at a time (`generate`, the compiled single-sequence decoder)."""
    from ..generate import generate

    rows = [task_row(ex) for ex in tasks.generate(n_prompts, split=split, seed=seed)]
    texts = [prompt_text(tokenizer, model, r) for r in rows]
    sampling = Sampling(temperature=temperature)
    batch_generate(model, tokenizer, texts[:1], n=2, max_tokens=8, sampling=sampling)  # warm up
    generate(model, tokenizer, texts[0], max_tokens=8, sampling=sampling)
    mx.random.seed(seed)
    tic = time.perf_counter()
    results = batch_generate(model, tokenizer, texts, n=group_size, max_tokens=max_tokens, sampling=sampling)
    batched_s = time.perf_counter() - tic
    batched_tokens = sum(len(r.tokens) for r in results)
    tic, single_tokens = time.perf_counter(), 0
    for text in texts:
        for _ in range(group_size):
            single_tokens += len(generate(model, tokenizer, text, max_tokens=max_tokens, sampling=sampling).tokens)
    single_s = time.perf_counter() - tic
    out = {"prompts": n_prompts, "group_size": group_size, "max_tokens": max_tokens,
           "batched_tokens": batched_tokens, "batched_tokens_per_s": batched_tokens / batched_s,
           "single_tokens": single_tokens, "single_tokens_per_s": single_tokens / single_s}
    out["speedup"] = out["batched_tokens_per_s"] / out["single_tokens_per_s"]
    return out
