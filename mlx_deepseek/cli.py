"""`mlx-deepseek`: one command, with subcommands. Parsing only; the work is in the library."""

from __future__ import annotations

import argparse
from pathlib import Path
import json
import sys
from typing import Optional


def cmd_info(a: argparse.Namespace) -> int:
    from .info import describe, human
    from .loading import resolve

    d = describe(resolve(a.model))
    if a.json:
        print(json.dumps(d, indent=2))
        return 0
    rows = [
        ("model", d["path"]),
        ("family", f"{d['model_type']}: {d['family']}"),
        ("attention", f"{d['attention']}, {d['layers']} layers"),
        ("feed-forward", d["moe"]),
        ("parameters", f"{human(d['parameters'])} total, {human(d['active_parameters'])} active per token"
         + (f", MTP module {human(d['mtp_parameters'])}" if d["mtp_parameters"] else "")),
        ("stored as", (", ".join(f"{k} x{v}" for k, v in d["dtypes"].items()) or "no weights")
         + f" ({human(d['disk_bytes'], 'B')} on disk)"),
        ("quantization", d["quantization"]),
        ("KV cache", f"{human(d['kv_cache_bytes_per_token'], 'B')} per token at {d['kv_cache_dtype_bytes']} bytes/value"
         + (f" (full per-head K/V would be {human(d['mha_kv_cache_bytes_per_token'], 'B')})" if d["attention"] == "MLA" else "")),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temp", type=float, default=0.0, help="temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def _sampling(a: argparse.Namespace):
    from .generate import Sampling

    return Sampling(a.temp, a.top_p, a.top_k, a.min_p, a.repetition_penalty, a.seed)


def _offload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert-memory", default=None,
                   help="offload routed experts: memory for the resident ones ('8GB', '25%%'); the rest stay on disk")
    p.add_argument("--expert-policy", default="lru", choices=("lru", "lfu"), help="which resident expert a miss evicts")
    p.add_argument("--expert-profile", default=None,
                   help="expert counts (a generate --json output) to split the budget across layers and pin hot experts")
    p.add_argument("--pin-experts", type=float, default=0.0, help="share of each layer's slots pinned to its hottest experts")
    p.add_argument("--prefetch-experts", action="store_true", help="read the next layer's likely experts ahead")


def _offload(a: argparse.Namespace) -> dict:
    """load()'s offloading options from the parsed flags (expert_memory None: no offloading)."""
    return {"expert_memory": a.expert_memory, "offload": {
        "policy": a.expert_policy, "profile": a.expert_profile, "pin": a.pin_experts, "prefetch": a.prefetch_experts}}


def cmd_generate(a: argparse.Namespace) -> int:
    from . import load
    from .chat import apply_chat_template
    from .generate import stream_generate

    sampling = _sampling(a)
    if a.parallel and (status := _on_ranks(a)) is not None:
        return status
    if a.parallel:
        from .parallel import join

        if a.mtp or getattr(a, "expert_memory", None) is not None:
            raise ValueError("--mtp and expert offloading do not run with --parallel; leave them out")
        model, tokenizer, sampling.seed = join(a.model, a.parallel, a.dtype, sampling.seed)
    else:
        model, tokenizer = load(a.model, dtype=a.dtype, **_offload(a))
    if a.raw:
        prompt = a.prompt
    else:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
        prompt = apply_chat_template(tokenizer, messages, model.args.model_type, a.template)
    stream = stream_generate(
        model, tokenizer, prompt, max_tokens=a.max_tokens, sampling=sampling, stop=a.stop or (),
        mtp=a.mtp, trace=a.json and a.parallel != "pp", kv_bits=a.kv_bits,
    )
    in_reasoning = False
    for chunk in stream:
        if not a.json:
            if chunk.reasoning and not in_reasoning:
                print("<think>", flush=True)
                in_reasoning = True
            print(chunk.reasoning, end="", flush=True)
            if chunk.answer and in_reasoning:
                print("\n</think>\n", flush=True)
                in_reasoning = False
            print(chunk.answer, end="", flush=True)
        result = chunk.result
    if a.json:
        out = result.to_dict()
        trace = out.pop("expert_trace")
        out["experts"] = trace
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print(flush=True)
    line = (
        f"prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.1f} tok/s | generation: "
        f"{result.generation_tokens} tokens, {result.generation_tps:.1f} tok/s | peak memory {result.peak_memory_gb:.3f} GB"
    )
    if result.mtp_acceptance is not None:
        line += f" | MTP acceptance {result.mtp_acceptance:.0%}"
    if result.offload is not None:
        d = result.offload["decode"]
        line += (f" | experts offloaded ({result.offload['residency']:.0%} resident): decode hit rate "
                 f"{d['hit_rate'] or 0:.1%}, {d['bytes_read_per_token'] / 1e6:.2f} MB read/token, {d['stall_s']:.2f} s stalled")
    print(line, file=sys.stderr)
    return 0


def _on_ranks(a: argparse.Namespace) -> Optional[int]:
    """With --hostfile / --ranks, outside mlx.launch: this command re-run on every rank through mlx.launch (its
    exit status); None when it should run here (no launch flags, or already one of the ranks)."""
    from .parallel.launch import launched, relaunch

    if not (a.hostfile or a.ranks) or launched():
        return None
    return relaunch(a.argv, a.ranks, a.hostfile, a.backend)


def _parallel_args(p: argparse.ArgumentParser, what: str) -> None:
    """Flags that run a command on several ranks (mlx.launch underneath; see DISTRIBUTED.md)."""
    p.add_argument("--hostfile", default=None, help=f"mlx.launch hostfile: {what} on these machines")
    p.add_argument("--ranks", type=int, default=None, help=f"{what} on N local ranks (ring over 127.0.0.1)")
    p.add_argument("--backend", default=None, choices=("ring", "jaccl", "jaccl-ring", "mpi", "nccl"),
                   help="mlx.distributed backend (default: the hostfile's, else ring; nccl on CUDA)")


def _moe_bench_args(p: argparse.ArgumentParser, model_help: str, layers: int, prompt_tokens: int, gen_tokens: int,
                    trials: int) -> None:
    """The checkpoint and run flags shared by the MoE benchmarks (offload, distributed)."""
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--layers", type=int, default=layers, help="layers of the random checkpoint")
    p.add_argument("--scale", type=float, default=0.5, help="width scale of the random checkpoint")
    p.add_argument("--bits", type=int, default=4, help="quantization of the random checkpoint (0: unquantized)")
    p.add_argument("--prompt-tokens", type=int, default=prompt_tokens)
    p.add_argument("--gen-tokens", type=int, default=gen_tokens)
    p.add_argument("--trials", type=int, default=trials)
    p.add_argument("--json", action="store_true")


def cmd_bench_distributed(a: argparse.Namespace) -> int:
    from .parallel.bench import bench_distributed, format_distributed

    r = bench_distributed(a.ranks or 2, a.hostfile, a.backend, a.layers, a.scale, a.bits or None, a.prompt_tokens,
                          a.gen_tokens, a.trials, a.batch, a.seq_len, a.steps, a.model)
    print(json.dumps(r, indent=2) if a.json else format_distributed(r))
    return 0


def cmd_bench_generate(a: argparse.Namespace) -> int:
    from .bench import bench_generate, format_generate

    r = bench_generate(a.model, a.prompt_tokens, a.gen_tokens, a.layers, a.scale, a.bits or None, a.trials)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print(format_generate(r))
    return 0


def cmd_bench_offload(a: argparse.Namespace) -> int:
    from .offload.bench import bench_offload, format_offload

    r = bench_offload(a.model, a.layers, a.scale, a.bits or None, a.prompt_tokens, a.gen_tokens, a.trials)
    print(json.dumps(r, indent=2) if a.json else format_offload(r))
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from convert import convert
    from convert.recipes import describe

    if a.list_recipes:
        print(describe())
        return 0
    if a.src is None or a.output is None:
        raise ValueError("convert needs SRC and -o DST (or --list-recipes)")
    report = convert(
        a.src, a.output, to=a.to, dtype=a.dtype, q_bits=a.q_bits, q_group_size=a.q_group_size,
        recipe=a.recipe or ("uniform" if a.quantize else None), high_bits=a.high_bits, dequantize=a.dequantize,
        drop_mtp=a.drop_mtp, shard_size=a.shard_size, overwrite=a.overwrite, verify=a.verify,
        progress=not a.no_progress,
    )
    print(report.summary())
    return 0


def cmd_bench_convert(a: argparse.Namespace) -> int:
    from convert.bench import bench_convert

    return bench_convert(a)


_TRAIN_SETTINGS = (  # flag -> TrainConfig field, for `train pretrain` and `train sft`
    "steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip", "mtp_weight",
    "bias_gamma", "seq_aux_alpha", "expert_aux_alpha", "device_aux_alpha", "n_devices", "data_seed", "seed",
    "log_every", "eval_every", "save_every", "beyond",
)


def cmd_train(a: argparse.Namespace) -> int:
    if a.train == "plot":
        from .train.plot import plot_grpo, plot_runs

        # a run folder's metrics.jsonl is labelled by its folder, a copied NAME.metrics.jsonl by NAME
        paths = [Path(m) for m in a.metrics]
        labels = [p.parent.name if p.name == "metrics.jsonl" else p.name.removesuffix(".jsonl").removesuffix(".metrics")
                  for p in paths]
        runs = list(zip(labels, paths))
        print(f"wrote {(plot_grpo if a.grpo else plot_runs)(runs, Path(a.output))}")
        return 0
    if a.train == "tokenizer":
        from .train.vocab import train_tokenizer

        out = train_tokenizer(a.out, vocab_size=a.vocab_size, n_texts=a.texts, seed=a.seed, overwrite=a.overwrite)
        print(f"tokenizer written to {out}")
        return 0
    from .train.loop import TrainConfig

    settings = {k: getattr(a, k, None) for k in _TRAIN_SETTINGS if getattr(a, k, None) is not None}
    if a.no_compile:
        settings["compile"] = False
    if a.train == "pretrain":
        from .train.pretrain import pretrain

        if (status := _on_ranks(a)) is not None:  # data parallelism: this command on every rank
            return status
        out = pretrain(a.out, TrainConfig.from_dict(settings), config=a.config, tokenizer=a.tokenizer,
                       resume=a.resume, progress=not a.no_progress, init=a.init)
    else:
        from .train.lora import LoraSettings
        from .train.sft import sft, sft_config

        adapters = LoraSettings.for_finetune(a.finetune, _lora_flags(a))
        out = sft(a.model, a.out, sft_config(**settings), resume=a.resume, progress=not a.no_progress,
                  grow_mtp=a.grow_mtp, adapters=adapters)
    print(f"model written to {out} (metrics in {out.parent / 'metrics.jsonl'})")
    return 0


def _add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train nano-r1 style models: tokenizer, pretrain, sft")
    kinds = train.add_subparsers(dest="train", required=True)
    plot = kinds.add_parser("plot", help="training curves of runs (metrics.jsonl files, in order) as a PNG")
    plot.add_argument("metrics", nargs="+", help="metrics.jsonl of each run")
    plot.add_argument("-o", "--output", required=True, help="PNG file")
    plot.add_argument("--grpo", action="store_true", help="GRPO runs: rewards and held-out accuracy")
    plot.set_defaults(func=cmd_train)
    tok = kinds.add_parser("tokenizer", help="train the sentencepiece tokenizer on the synthetic task corpus")
    tok.add_argument("--out", required=True, help="tokenizer folder (written atomically)")
    tok.add_argument("--vocab-size", type=int, default=768)
    tok.add_argument("--texts", type=int, default=20000, help="task examples in the training corpus")
    tok.add_argument("--seed", type=int, default=0)
    tok.add_argument("--overwrite", action="store_true")
    tok.set_defaults(func=cmd_train)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, model/")
        p.add_argument("--steps", type=int)
        p.add_argument("--batch", dest="batch_size", type=int, help="sequences per step")
        p.add_argument("--seq-len", type=int, help="tokens per packed sequence")
        p.add_argument("--lr", type=float, help="peak learning rate (AdamW, warmup then cosine)")
        p.add_argument("--min-lr-ratio", type=float, help="final lr as a fraction of the peak")
        p.add_argument("--warmup", type=int, help="warmup steps")
        p.add_argument("--weight-decay", type=float)
        p.add_argument("--grad-clip", type=float)
        p.add_argument("--mtp-weight", type=float, help="lambda of the MTP loss (0: off)")
        p.add_argument("--bias-gamma", type=float, help="aux-loss-free bias update speed (0: off)")
        p.add_argument("--seq-aux-alpha", type=float, help="V3 sequence-wise balance loss weight")
        p.add_argument("--expert-aux-alpha", type=float, help="V2 expert-level balance loss weight")
        p.add_argument("--device-aux-alpha", type=float, help="V2 device-level balance loss weight")
        p.add_argument("--n-devices", type=int, help="device groups for the device-level loss")
        p.add_argument("--data-seed", type=int)
        p.add_argument("--seed", type=int, help="initialisation seed")
        p.add_argument("--log-every", type=int)
        p.add_argument("--eval-every", type=int, help="heldout loss every N steps (0: never)")
        p.add_argument("--save-every", type=int, help="checkpoint every N steps")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
        p.add_argument("--no-compile", action="store_true", help="run the step uncompiled")
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(func=cmd_train)

    pre = kinds.add_parser("pretrain", help="pretrain from scratch: next-token + MTP loss, aux-loss-free balancing")
    pre.add_argument("--config", default=None, help="model config.json (default: the nano-r1 config)")
    pre.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train one into OUT/tokenizer)")
    pre.add_argument("--init", default=None, metavar="MODEL",
                     help="continue pretraining this model folder (its weights, config and tokenizer)")
    pre.add_argument("--beyond", type=float, metavar="SHARE",
                     help="share of examples drawn beyond the training levels (train-side problems at the hard levels)")
    common(pre)
    _parallel_args(pre, "train data-parallel")
    sft = kinds.add_parser("sft", help="cold-start SFT on chat-formatted traces (loss on assistant tokens only)")
    sft.add_argument("--model", default=None, help="model folder to fine-tune (default: the bundled nano-r1)")
    sft.add_argument("--grow-mtp", type=int, default=None, metavar="D",
                     help="give the model D MTP modules, the new ones copies of its last, and train only those")
    _adapter_args(sft, "full", "all weights, or LoRA/DoRA adapters on the frozen model (out/adapters; out/model fused)")
    common(sft)
    _add_grpo_parsers(kinds)


def cmd_grpo(a: argparse.Namespace) -> int:
    from .train.grpo import GRPOConfig, grpo
    from .train.rewards import parse_weights

    settings = {k: getattr(a, k) for k in _GRPO_SETTINGS if getattr(a, k, None) is not None}
    if a.data:
        settings["task"], settings["data"] = None, a.data
    if a.reward:
        settings["rewards"] = parse_weights(a.reward)
    options = {"levels": tuple(a.levels)} if a.levels else {}
    if a.kinds:
        options["kinds"] = tuple(a.kinds)
    if a.beyond is not None:
        if not 0 < a.beyond <= 1:
            raise SystemExit(f"--beyond {a.beyond}: a share of the prompts, above 0 and at most 1")
        options["beyond"] = a.beyond
    settings["task_options"] = options
    lora = _lora_flags(a)
    if lora:
        settings["lora"] = lora
    for flag in ("mask_truncated",):
        settings[flag] = getattr(a, flag)
    if a.keep_quantized:
        settings["dequantize"] = False
    if (status := _on_ranks(a)) is not None:  # data parallelism: this command on every rank
        return status
    out = grpo(a.model, a.out, GRPOConfig.from_dict(settings), resume=a.resume, progress=not a.no_progress)
    print(f"model written to {out} (metrics in {out.parent / 'metrics.jsonl'})")
    return 0


def cmd_rejection_sample(a: argparse.Namespace) -> int:
    from .train.distill import rejection_sample

    r = rejection_sample(a.model, a.out, task=None if a.data else a.task, data=a.data, n_prompts=a.prompts,
                         samples=a.samples, temperature=a.temp, top_p=a.top_p, max_tokens=a.max_tokens, split=a.split,
                         seed=a.seed, keep_per_prompt=a.keep_per_prompt, progress=not a.no_progress)
    print(json.dumps(r))
    return 0


def cmd_distill(a: argparse.Namespace) -> int:
    from .train.distill import distill
    from .train.sft import sft_config

    settings = {k: getattr(a, k) for k in ("steps", "batch_size", "seq_len", "lr") if getattr(a, k) is not None}
    r = distill(a.teacher, a.student, a.out, dict(task=a.task, n_prompts=a.prompts, samples=a.samples,
                                                   temperature=a.temp, max_tokens=a.max_tokens, split=a.split, seed=a.seed),
                sft_config(eval_every=0, **settings), resume=a.resume, progress=not a.no_progress)
    print(json.dumps(r))
    return 0


_GRPO_SETTINGS = (  # flag -> GRPOConfig field
    "steps", "prompts_per_step", "group_size", "max_completion_tokens", "micro_batch_tokens", "temperature", "top_p",
    "loss_type", "scale_rewards", "beta", "epsilon", "epsilon_high", "mu", "resample_zero_std", "skip_settled", "lr",
    "warmup", "min_lr_ratio", "weight_decay", "grad_clip", "finetune", "bias_gamma", "reward_file", "task", "split",
    "data_seed", "seed", "eval_every", "eval_split", "eval_data", "eval_n", "eval_max_tokens", "log_every",
    "save_every", "max_minutes",
)


def _adapter_args(p: argparse.ArgumentParser, default: Optional[str], help: str) -> None:
    """--finetune and the adapters' --lora-* settings (train sft, train grpo)."""
    p.add_argument("--finetune", default=default, choices=("full", "lora", "dora"), help=help)
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-scale", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-layers", type=int, help="adapt the last N layers (0: all)")


def _lora_flags(a: argparse.Namespace) -> dict:
    """The --lora-* settings given (LoraSettings fields)."""
    return {k: getattr(a, f"lora_{k}") for k in ("rank", "scale", "dropout", "layers") if getattr(a, f"lora_{k}") is not None}


def _add_grpo_parsers(kinds) -> None:
    from .train.tasks import KINDS

    g = kinds.add_parser("grpo", help="GRPO with rule-based rewards (the R1 recipe): LoRA/DoRA or full")
    g.add_argument("--model", default=None, help="model folder to train (default: the bundled nano-r1)")
    g.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, model/, adapters/")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--task", choices=("arithmetic",), help="prompts from the synthetic task (the default)")
    src.add_argument("--data", help="prompts from a JSONL file (prompt, answer, optional lang and bucket)")
    g.add_argument("--split", choices=("train", "heldout", "hard"), help="task split of the prompts")
    g.add_argument("--levels", type=int, nargs=2, metavar=("LO", "HI"), help="task difficulty levels (digits)")
    g.add_argument("--kinds", nargs="+", choices=KINDS, metavar="KIND",
                   help=f"task kinds of the prompts, drawn uniformly from the list (repeat one to weight it): "
                        f"{', '.join(KINDS)}")
    g.add_argument("--beyond", type=float, nargs="?", const=1.0, metavar="SHARE",
                   help="train-split prompts at the hard split's levels (more digits than SFT saw; no hard-split "
                        "problem): all of them, or SHARE of them and the rest at the training levels")
    g.add_argument("--steps", type=int, help="rollout batches")
    g.add_argument("--prompts", dest="prompts_per_step", type=int, help="prompts per step")
    g.add_argument("--group-size", type=int, help="samples per prompt (G)")
    g.add_argument("--max-completion-tokens", type=int)
    g.add_argument("--micro-batch-tokens", type=int, help="padded tokens per forward/backward pass (rows of like "
                   "length go together; lower it to save memory)")
    g.add_argument("--temp", dest="temperature", type=float, help="sampling temperature (log-probs are scaled by it)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--loss-type", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    g.add_argument("--scale-rewards", choices=("group", "batch", "none"), help="advantage std: per group, batch or none")
    g.add_argument("--beta", type=float, help="KL weight (0: no reference model)")
    g.add_argument("--epsilon", type=float, help="clip range (low)")
    g.add_argument("--epsilon-high", type=float, help="clip range (high; DAPO's clip-higher)")
    g.add_argument("--mu", type=int, help="optimizer updates per rollout batch")
    g.add_argument("--mask-truncated", action="store_true", help="no loss on completions cut at the length limit")
    g.add_argument("--resample-zero-std", type=int, help="rounds of fresh prompts replacing zero-variance groups")
    g.add_argument("--skip-settled", type=int, metavar="K", help="online difficulty filter: skip the prompts of a "
                   "bucket (task kind and level, or a JSONL row's bucket) whose last K groups' rewards all agreed, "
                   "but for one probe in K (0: off)")
    g.add_argument("--reward", action="append", help="NAME[=WEIGHT] (repeatable): accuracy, format, language or "
                   "a function of --reward-file")
    g.add_argument("--reward-file", help="Python file with reward functions fn(completion, example) -> float")
    _adapter_args(g, None, "LoRA (the default), DoRA adapters or all weights")
    g.add_argument("--keep-quantized", action="store_true", help="LoRA on the quantized weights (default: float32)")
    g.add_argument("--bias-gamma", type=float, help="move the router bias by the expert load (0: frozen)")
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup", type=int)
    g.add_argument("--min-lr-ratio", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--data-seed", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--eval-every", type=int, help="held-out evaluation every N steps (0: never)")
    g.add_argument("--eval-split", choices=("heldout", "hard", "train"))
    g.add_argument("--eval-data", help="held-out JSONL (prompt, answer)")
    g.add_argument("--eval-n", type=int)
    g.add_argument("--eval-max-tokens", type=int)
    g.add_argument("--log-every", type=int)
    g.add_argument("--save-every", type=int)
    g.add_argument("--max-minutes", type=float, help="stop after the step that passes this wall time")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--no-progress", action="store_true")
    _parallel_args(g, "train data-parallel (--prompts counts all ranks' prompts)")
    g.set_defaults(func=cmd_grpo)

    rs = kinds.add_parser("rejection-sample", help="sample a model, keep its correct answers as SFT data (JSONL)")
    rs.add_argument("--model", default=None)
    rs.add_argument("--out", required=True, help="JSONL file")
    rs.add_argument("--task", default="arithmetic", choices=("arithmetic",))
    rs.add_argument("--data", default=None, help="prompts from a JSONL file (prompt, answer)")
    rs.add_argument("--keep-per-prompt", type=int, default=1)
    ds = kinds.add_parser("distill", help="teacher samples (rejection-sampled) -> SFT of the student")
    ds.add_argument("--teacher", default=None, help="default: the bundled nano-r1")
    ds.add_argument("--student", required=True, help="model folder to fine-tune")
    ds.add_argument("--out", required=True, help="folder: teacher_samples.jsonl, sft/")
    ds.add_argument("--task", default="arithmetic", choices=("arithmetic",))
    ds.add_argument("--steps", type=int)
    ds.add_argument("--batch", dest="batch_size", type=int)
    ds.add_argument("--seq-len", type=int)
    ds.add_argument("--lr", type=float)
    ds.add_argument("--resume", action="store_true")
    for p in (rs, ds):
        p.add_argument("--prompts", type=int, default=64)
        p.add_argument("--samples", type=int, default=8, help="samples per prompt")
        p.add_argument("--temp", type=float, default=0.8)
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--split", default="train", choices=("train", "heldout", "hard"))
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-progress", action="store_true")
    rs.add_argument("--top-p", type=float, default=0.95)
    rs.set_defaults(func=cmd_rejection_sample)
    ds.set_defaults(func=cmd_distill)


def cmd_fuse(a: argparse.Namespace) -> int:
    from .train.grpo import fuse_adapters

    print(f"fused model written to {fuse_adapters(a.model, a.adapters, a.out, dequantize=a.dequantize)}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from app.server import serve

    serve(a.model, host=a.host, port=a.port, api_key=a.api_key, max_tokens_limit=a.max_tokens_limit,
          max_request_bytes=a.max_request_bytes, **_offload(a))
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    from app import launch

    launch(a.model, host=a.host, port=a.port, open_browser=not a.no_browser, share=a.share, **_offload(a))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from . import load
    from .evaluate import evaluate

    model, tokenizer = load(a.model)
    r = evaluate(model, tokenizer, a.task, a.split, a.n, a.batch_size, a.max_tokens, a.speed_samples,
                 samples=a.samples, temperature=a.temp)
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"{a.task} ({a.split}, {r['n']} problems, greedy): accuracy {r['accuracy']:.1%}, format {r['format']:.1%}, "
          f"language {r['language']:.1%}")
    print("by kind and level: " + ", ".join(f"{k} {v:.0%}" for k, v in r["by_kind"].items()))
    if a.samples:
        print(f"sampled (temperature {a.temp}, {a.samples} per problem): pass@1 {r['sampled_accuracy']:.1%}, "
              f"pass@{a.samples} {r['pass_at_k']:.1%}; by kind: "
              + ", ".join(f"{k} {v:.0%}" for k, v in r["sampled_by_kind"].items()))
    if "decode_tps" in r:  # measured on --speed-samples of the problems
        print(f"decode {r['decode_tps']:.1f} tok/s")
        for d in r.get("mtp_depths", []):
            print(f"MTP drafting {d['depth']}: acceptance {d['acceptance']:.1%}, {d['tokens_per_step']:.2f} tokens/step, "
                  f"{d['decode_tps']:.1f} tok/s ({d['speedup']:.2f}x)")
    if "expert_load_max_over_mean" in r:
        print("expert load max/mean per MoE layer: " + ", ".join(f"{x:.2f}" for x in r["expert_load_max_over_mean"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-deepseek", description="The DeepSeek model family in MLX.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what a checkpoint is: family, parameters, dtype, KV-cache cost")
    info.add_argument("model", nargs="?", default=None, help="model folder or hub id (default: the bundled nano-r1)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="generate an answer (reasoning and answer shown apart)")
    gen.add_argument("--model", default=None, help="model folder or hub id (default: the bundled nano-r1)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--system", default=None, help="system prompt")
    gen.add_argument("--max-tokens", type=int, default=256)
    _sampling_args(gen)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--mtp", nargs="?", const=True, default=False, type=int, metavar="D",
                     help="MTP self-speculative decoding (D: draft with the model's first D MTP modules; default all)")
    gen.add_argument("--kv-bits", type=int, default=None, choices=(4, 8), help="quantize the KV cache")
    gen.add_argument("--template", default=None, choices=("r1", "v3", "v2", "v1"), help="built-in chat template")
    gen.add_argument("--raw", action="store_true", help="use the prompt as is, without a chat template")
    gen.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    gen.add_argument("--json", action="store_true", help="print one JSON object (with the expert statistics)")
    gen.add_argument("--parallel", default=None, choices=("ep", "pp"),
                     help="split the model over ranks: ep (routed experts) or pp (layers); each rank reads its part")
    _parallel_args(gen, "generate")
    _offload_args(gen)
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser(
        "convert", help="convert and quantize, streaming shard by shard (HF / FP8 -> MLX, MLX -> HF)",
        description="SRC (a folder or hub id) -> DST. Default: the MLX layout that this project and mlx_lm.load "
        "read, float in the stored dtype (FP8 -> bfloat16).",
    )
    conv.add_argument("src", nargs="?", help="model folder or hub id")
    conv.add_argument("-o", "--output", help="destination folder (written atomically)")
    conv.add_argument("-q", "--quantize", action="store_true", help="quantize (the uniform recipe unless --recipe)")
    conv.add_argument("--q-bits", type=int, default=None, choices=(2, 3, 4, 5, 6, 8), help="quantize to B bits (default 4)")
    conv.add_argument("--q-group-size", type=int, default=64, choices=(32, 64, 128))
    conv.add_argument("--recipe", default=None, help="which layers get which bits (see --list-recipes)")
    conv.add_argument("--high-bits", type=int, default=6, choices=(2, 3, 4, 5, 6, 8), help="the wider width of mixed recipes")
    conv.add_argument("--list-recipes", action="store_true", help="list the quantization recipes")
    conv.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                      help="float dtype (default: as stored; FP8 becomes bfloat16)")
    conv.add_argument("--dequantize", action="store_true", help="a quantized MLX model back to floats")
    conv.add_argument("--to", default="mlx", choices=("mlx", "hf"), help="output layout (hf: the hub's, float)")
    conv.add_argument("--drop-mtp", action="store_true", help="leave out the Multi-Token-Prediction module")
    conv.add_argument("--shard-size", default="5GB", help="largest output shard (default 5GB)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    conv.add_argument("--verify", action="store_true", help="compare DST's logits with SRC's on a short prompt")
    conv.add_argument("--no-progress", action="store_true")
    conv.set_defaults(func=cmd_convert)

    _add_train_parser(sub)

    fu = sub.add_parser("fuse", help="fold LoRA/DoRA adapters into a model's weights")
    fu.add_argument("--model", default=None, help="the base model the adapters were trained on (default: nano-r1)")
    fu.add_argument("--adapters", required=True, help="adapter folder (adapters.safetensors, adapter_config.json)")
    fu.add_argument("--out", required=True, help="model folder to write (atomically)")
    fu.add_argument("--dequantize", action="store_true", help="write floats (default: quantized like the base)")
    fu.set_defaults(func=cmd_fuse)

    ev = sub.add_parser("eval", help="accuracy, format, language, MTP acceptance and expert balance on a task")
    ev.add_argument("--model", default=None, help="model folder or hub id (default: the bundled nano-r1)")
    ev.add_argument("--task", default="arithmetic", choices=("arithmetic",))
    ev.add_argument("--split", default="heldout", choices=("heldout", "hard", "train"))
    ev.add_argument("--n", type=int, default=200, help="problems")
    ev.add_argument("--batch-size", type=int, default=50)
    ev.add_argument("--max-tokens", type=int, default=400)
    ev.add_argument("--speed-samples", type=int, default=10, help="problems also decoded one by one, with and without MTP")
    ev.add_argument("--samples", type=int, default=0, metavar="K",
                    help="also sample K answers per problem: pass@1 over the K samples, and pass@K")
    ev.add_argument("--temp", type=float, default=1.0, help="temperature of --samples")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    srv = sub.add_parser("serve", help="an OpenAI-compatible API (reasoning in reasoning_content)")
    srv.add_argument("--model", default=None, help="model folder or hub id (default: the bundled nano-r1)")
    _offload_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    srv.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    srv.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    srv.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="the chat app in the browser: reasoning, answer and the experts it used")
    chat.add_argument("--model", default=None, help="model folder or hub id (default: the bundled nano-r1)")
    _offload_args(chat)
    chat.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    chat.add_argument("--port", type=int, default=7860)
    chat.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    chat.add_argument("--share", action="store_true", help="also make a public Gradio share link (off by default)")
    chat.set_defaults(func=cmd_chat)

    # `bench X`: each benchmark registers a sub-parser here (measured side by side with mlx-lm).
    bench = sub.add_parser("bench", help="measure this project against mlx-lm on the same checkpoint")
    benches = bench.add_subparsers(dest="bench", required=True)
    bg = benches.add_parser("generate", help="prefill/decode tokens/s vs mlx-lm (plain and MTP)")
    bg.add_argument("--model", default=None, help="a checkpoint both load (default: a random V2-Lite-shaped one)")
    bg.add_argument("--prompt-tokens", type=int, default=128)
    bg.add_argument("--gen-tokens", type=int, default=128)
    bg.add_argument("--layers", type=int, default=8, help="layers of the random checkpoint")
    bg.add_argument("--scale", type=float, default=1.0, help="width scale of the random checkpoint")
    bg.add_argument("--bits", type=int, default=4, help="quantization of the random checkpoint (0: bfloat16)")
    bg.add_argument("--trials", type=int, default=3)
    bg.add_argument("--json", action="store_true")
    bg.set_defaults(func=cmd_bench_generate)
    bo = benches.add_parser("offload", help="expert offloading: decode tok/s and hit rates at 100/50/25/12.5%% residency")
    _moe_bench_args(bo, "an MoE checkpoint (default: a random V2-Lite-shaped one, routers balanced)", 4, 32, 48, 2)
    bo.set_defaults(func=cmd_bench_offload)
    bd = benches.add_parser("distributed", help="1 rank vs N: EP/PP decode tok/s, DP training tok/s, bytes read")
    _moe_bench_args(bd, "an MoE checkpoint (default: a random V2-Lite-shaped one)", 8, 64, 64, 3)
    bd.add_argument("--batch", type=int, default=8, help="global training batch (sequences)")
    bd.add_argument("--seq-len", type=int, default=128)
    bd.add_argument("--steps", type=int, default=5, help="timed training steps")
    _parallel_args(bd, "measure")
    bd.set_defaults(func=cmd_bench_distributed)
    bc = benches.add_parser("convert", help="time and peak RSS of this converter vs mlx_lm.convert")
    bc.add_argument("--layers", type=int, default=3, help="layers of the random V2-Lite-shaped checkpoint")
    bc.add_argument("--scale", type=float, default=1.0, help="width scale of the random checkpoint")
    bc.add_argument("--variants", default="bf16,fp8", help="source formats, comma-separated (bf16, fp8)")
    bc.add_argument("--shard-size", default="1GB", help="input shard size (the output uses the same)")
    bc.add_argument("--bits", type=int, default=4, help="quantization of both tools' output")
    bc.add_argument("--group-size", type=int, default=64)
    bc.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    bc.add_argument("--write", action="store_true", help="append the results to BENCHMARKS.md")
    bc.add_argument("--json", action="store_true")
    bc.set_defaults(func=cmd_bench_convert)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # re-run on every rank by --hostfile / --ranks
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # ConfigError, CheckpointError, bad paths
        print(f"mlx-deepseek {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
