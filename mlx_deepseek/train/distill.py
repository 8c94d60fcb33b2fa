"""The R1 stages around RL (R1 §2.3.3, §2.4): rejection-sampling SFT data and distillation.

- `rejection_sample`: G samples per prompt from a model; keep the correct ones (accuracy and format rewards
  both 1, at most `keep_per_prompt` distinct ones per prompt) as chat-formatted SFT rows in a JSONL file:
  {"prompt", "completion", "answer", "lang", ...} where completion is `<think>` ... `</think>` answer EOS.
- `sft_on_jsonl`: SFT (the shared loop, prompt masked) on such a file.
- `distill`: teacher samples -> rejection sampling -> student SFT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..chat import ASSISTANT, BOS, EOS, USER
from ..generate import Sampling, batch_generate
from .data import PackedBatches
from .grpo import PromptStream, prompt_text, read_jsonl
from .loop import Trainer, load_for_training, run_folder
from .rewards import accuracy_reward, format_reward, with_think
from .sft import sft_config


@dataclass
class Conversation:
    """One SFT example from a JSONL row: what `data.encode_example` needs."""

    prompt_text: str
    completion: str


def sft_rows_to_examples(rows: list[dict]) -> list[Conversation]:
    return [Conversation(f"{BOS}{USER}{r['prompt']}{ASSISTANT}", r["completion"]) for r in rows]


class JsonlBatches(PackedBatches):
    """PackedBatches over the rows of an SFT JSONL file (cycled in order) instead of the task stream."""

    def __init__(self, tokenizer, rows: list[dict], batch_size: int, seq_len: int, mask_prompt: bool = True):
        super().__init__(tokenizer, batch_size, seq_len, mask_prompt=mask_prompt)
        self.examples = sft_rows_to_examples(rows)

    def example(self, position: int) -> Conversation:
        return self.examples[position % len(self.examples)]


def rejection_sample(
    model_path, out: Union[str, Path], task: Optional[str] = "arithmetic", data: Optional[str] = None,
    n_prompts: int = 64, samples: int = 8, temperature: float = 0.8, top_p: float = 0.95, max_tokens: int = 256,
    split: str = "train", seed: int = 0, keep_per_prompt: int = 1, batch_prompts: int = 8, task_options=None,
    progress: bool = True,
) -> dict:
    """Write the kept samples to `out` (JSONL, atomically); returns counts."""
    from tqdm import tqdm

    import mlx.core as mx

    model, tok, _ = load_for_training(model_path)
    stream = PromptStream(task, data, split, seed, task_options)
    mx.random.seed(seed)
    kept, seen, tried = [], 0, 0
    bar = tqdm(total=n_prompts, disable=not progress, unit="prompt")
    while seen < n_prompts:
        rows = stream.take(min(batch_prompts, n_prompts - seen))
        texts = [prompt_text(tok, model, r) for r in rows]
        results = batch_generate(model, tok, texts, n=samples, max_tokens=max_tokens,
                                 sampling=Sampling(temperature=temperature, top_p=top_p))
        for p, (row, text) in enumerate(zip(rows, texts)):
            ex = {**row, "prompt_text": text}
            chosen = []
            for r in results[p * samples:(p + 1) * samples]:
                tried += 1
                full = with_think(r.text, ex).lstrip()
                if r.finish_reason == "stop" and accuracy_reward(r.text, ex) == 1 and format_reward(r.text, ex) == 1 \
                        and full not in chosen and len(chosen) < keep_per_prompt:
                    chosen.append(full)
            kept += [{**{k: v for k, v in row.items() if k != "prompt_text"}, "completion": c + EOS} for c in chosen]
        seen += len(rows)
        bar.update(len(rows))
    bar.close()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    tmp.replace(out)
    return {"prompts": seen, "samples": tried, "kept": len(kept), "prompts_with_a_correct_sample":
            len({json.dumps(r["prompt"]) for r in kept}), "out": str(out)}


def sft_on_jsonl(model_path, rows_file: Union[str, Path], out: Union[str, Path], cfg=None, resume: bool = False,
                 progress: bool = True) -> Path:
    """SFT of the model (float32; a quantized one dequantized) on a rejection-sampled JSONL file."""
    cfg = cfg or sft_config(eval_every=0)
    out = run_folder(out, resume)
    rows = read_jsonl_sft(rows_file)
    model, tok, folder = load_for_training(model_path)
    trainer = Trainer(model, tok, cfg, out, progress=progress, tokenizer_dir=folder)
    trainer.data = JsonlBatches(tok, rows, cfg.batch_size, cfg.seq_len, mask_prompt=True)
    return trainer.run(resume=resume)


def read_jsonl_sft(path: Union[str, Path]) -> list[dict]:
    rows = read_jsonl(path)
    missing = [i for i, r in enumerate(rows, 1) if "completion" not in r]
    if missing:
        raise ValueError(f"{path}: rows {missing[:5]} have no 'completion' (not SFT data)")
    return rows


def distill(teacher, student, out: Union[str, Path], sample_options: Optional[dict] = None, cfg=None,
            resume: bool = False, progress: bool = True) -> dict:
    """Teacher samples (rejection-sampled) -> SFT of the student; returns the sampling counts and out/sft/model."""
    out = Path(out)
    samples = out / "teacher_samples.jsonl"
    counts = rejection_sample(teacher, samples, progress=progress, **(sample_options or {})) \
        if not (resume and samples.exists()) else {"out": str(samples)}
    if counts.get("kept") == 0:
        raise ValueError("the teacher produced no correct sample to distill; sample more prompts (--prompts)")
    model = sft_on_jsonl(student, samples, out / "sft", cfg, resume=resume, progress=progress)
    return {**counts, "model": str(model)}
