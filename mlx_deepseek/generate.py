"""Generation: sampling, streaming with the reasoning split, prompt-cache reuse, MTP self-speculative
decoding, batched generation (G samples of a prompt share its prefill) and expert-activation traces."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .chat import THINK, ReasoningParser
from .models import Model, fastmath
from .models.cache import StaticKVCache
from .models.moe import RoutingTrace


@lru_cache(maxsize=None)
def _sampler(temperature: float, top_p: float, min_p: float, top_k: int):
    """Greedy takes the argmax of the raw logits; the others get log-probabilities (mlx-lm's top-p reads them as
    normalised)."""
    if temperature == 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    sample = make_sampler(temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    return lambda logits: sample(logits - fastmath.logsumexp(logits, axis=-1, keepdims=True))


@dataclass
class Sampling:
    """Sampling settings (mlx-lm's samplers underneath). temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None

    def sampler(self):
        """logits -> token ids; one function per setting, so the compiled decode steps are traced once per setting."""
        return _sampler(self.temperature, self.top_p if self.top_p < 1.0 else 0.0, self.min_p, self.top_k)

    def processors(self):
        return make_logits_processors(repetition_penalty=self.repetition_penalty)


# ---- expert traces -------------------------------------------------------------------------------
@dataclass
class ExpertTrace:
    """Per generated token and MoE layer: the chosen experts and their gate weights; per-layer load counts."""

    layers: list[int]  # the MoE layer indices, in order
    n_experts: int
    experts: list[np.ndarray] = field(default_factory=list)  # per token: [n_moe_layers, top_k] int
    weights: list[np.ndarray] = field(default_factory=list)  # per token: [n_moe_layers, top_k] float

    @property
    def load(self) -> np.ndarray:
        """[n_moe_layers, n_experts]: how often each expert was chosen over the generated tokens."""
        counts = np.zeros((len(self.layers), self.n_experts), dtype=np.int64)
        for e in self.experts:
            for i, row in enumerate(e):
                np.add.at(counts[i], row, 1)
        return counts

    def to_dict(self) -> dict:
        load = self.load
        mean = load.mean(axis=1, keepdims=True)
        return {
            "layers": self.layers,
            "experts": [e.tolist() for e in self.experts],
            "weights": [np.round(w.astype(np.float64), 5).tolist() for w in self.weights],
            "load": load.tolist(),
            "max_over_mean_load": np.where(mean[:, 0] > 0, load.max(axis=1) / np.maximum(mean[:, 0], 1e-9), 0).round(3).tolist(),
        }


class _TraceTaker:
    """Turns the RoutingTrace of each forward pass into per-token entries of an ExpertTrace."""

    def __init__(self, model: Model):
        self.main_layers = model.args.num_hidden_layers
        self.routing = RoutingTrace()
        layers = [i for i in range(model.args.num_hidden_layers) if model.args.is_moe_layer(i)]
        self.trace = ExpertTrace(layers, model.args.n_routed_experts or 0)
        model.set_routing_trace(self.routing)

    def take(self, positions: Sequence[int], row: int = 0) -> None:
        """Consume the oldest forward pass's routing (one record per main-model MoE layer) for these positions."""
        n = len(self.trace.layers)
        main = [r for r in self.routing.records if r[0] < self.main_layers]
        records, self.routing.records = main[:n], main[n:]
        if not records:
            return
        inds = [np.array(i[row]) for _, i, _ in records]  # per layer [L, k]
        weights = [np.array(w[row].astype(mx.float32)) for _, _, w in records]
        length = max(len(i) for i in inds)  # a prefill's last block runs the last position only: align right
        for p in positions:
            self.trace.experts.append(np.stack([i[p - length + len(i)] for i in inds]))
            self.trace.weights.append(np.stack([w[p - length + len(w)] for w in weights]))


# ---- caches ----------------------------------------------------------------------------------------
def activation_dtype(model: Model) -> mx.Dtype:
    return model.model.norm.weight.dtype


def make_cache(model: Model, kv_bits: Optional[int] = None, kv_group_size: int = 64, capacity: int = 256) -> list:
    """One cache per layer: fixed-capacity (so decode compiles), or with kv_bits stored quantized
    (for MLA: the latent and k_pe)."""
    if kv_bits is None:
        return [StaticKVCache(model.args, 1, capacity, activation_dtype(model)) for _ in model.layers]
    return [QuantizedKVCache(group_size=kv_group_size, bits=kv_bits) for _ in model.layers]


class CompiledSteps:
    """The decode steps, compiled once per model and sampler (and traced once per input shape), sampling included.

    Cache state goes in and out explicitly; the weights and the random state are implicit inputs, so one compiled
    graph serves every conversation, sees weights that change (fine-tuning) without retracing, and draws fresh
    random numbers every step.
    """

    def __init__(self, model: Model):
        self.model = model
        self._steps: dict = {}  # (step, sample) -> compiled function

    def _compiled(self, name: str, sample, fn):
        key = (name, sample)
        if key not in self._steps:
            self._steps[key] = mx.compile(fn, inputs=[self.model, mx.random.state], outputs=[mx.random.state])
        return self._steps[key]

    def next_token(self, sample):
        """(tokens [B, L], states) -> (sample(logits of the next position), states)."""
        def step(tokens, states):
            caches = StaticKVCache.wrap_layers(states)
            logits = self.model.logits(self.model.model(tokens, caches)[:, -1, :])
            return sample(logits), [c.state for c in caches]

        return self._compiled("next_token", sample, step)

    def speculative(self, sample):
        """(y, drafts, states, MTP states) -> (speculative_step's outputs, states, MTP states)."""
        def step(y, drafts, states, mtp_states):
            caches = StaticKVCache.wrap_layers(states)
            mtp_caches = [StaticKVCache.wrap(s) for s in mtp_states]
            out = speculative_step(self.model, y, drafts, caches, mtp_caches, sample)
            return out, [c.state for c in caches], [c.state for c in mtp_caches]

        return self._compiled("speculative", sample, step)


def speculative_step(model: Model, y: mx.array, drafts: mx.array, caches: list, mtp_caches: list, sample):
    """One MTP step: the main model verifies [t_n, d_1 .. d_D] (y = [t_n]) in one pass, `sample` draws the targets
    T_1 .. T_{D+1} from its logits ([D + 1, vocab] -> [D + 1]), the drafts are kept while they equal their
    targets, and the MTP modules draft the next D tokens (`speculate`). Returns (targets, accepted, the next
    token T_{accepted+1}, the next drafts). With fixed-capacity caches it is array arithmetic end to end (no host
    sync, so the next step can be queued); other caches are trimmed after reading `accepted`."""
    depth = len(mtp_caches)
    h = model.model(mx.concatenate([y, drafts])[None], caches)
    targets = sample(model.logits(h)[0])
    accepted = mx.cumprod((drafts == targets[:depth]).astype(mx.int32)).sum()
    drop = depth - accepted  # verified positions not kept
    for c in caches:
        if isinstance(c, StaticKVCache):
            c.state["offset"] = c.offset - drop
        else:  # mlx-lm's quantized cache keeps a Python offset
            c.trim(int(drop.item()))
    return targets, accepted, mx.take(targets, accepted[None]), speculate(model, h, targets[None], accepted, mtp_caches)


def speculate(model: Model, h: mx.array, targets: mx.array, accepted: mx.array, mtp_caches: list) -> mx.array:
    """After verifying [t_n, d_1 .. d_D] (D: the drafting MTP modules) with sampled targets T_1 .. T_{D+1}, of
    which the first `accepted` equalled the drafts: keep 1 + accepted positions in every MTP module's cache and
    return the next D drafts. Module k runs on the step's D + 1
    positions n + j: its hidden input is module k-1's output (the main model's for k = 0) and its token the one
    k + 1 places ahead, a verified target where there is one, else a draft of this step; its draft is its
    argmax at the last kept position. Pure array arithmetic: no host sync, so the next step can be queued."""
    depth = len(mtp_caches)
    drop = depth - accepted
    # the tokens after position n: T_1 .. T_{accepted+1}, then this step's drafts as they are made
    ahead = mx.concatenate([targets, mx.zeros((1, depth), targets.dtype)], axis=1)
    slots = mx.arange(2 * depth + 1)
    drafts = []
    for k, cache in enumerate(mtp_caches):
        h, logits = model.mtp_step(h, ahead[:, k : k + depth + 1], k, cache, at=accepted)
        cache.state["offset"] = cache.state["offset"] - drop
        draft = mx.argmax(logits, axis=-1)  # [1]
        ahead = mx.where(slots == accepted + 1 + k, draft, ahead)
        drafts.append(draft)
    return mx.concatenate(drafts)


def compiled_steps(model: Model) -> CompiledSteps:
    steps = model.__dict__.get("_compiled_steps")
    if steps is None:
        steps = CompiledSteps(model)
        object.__setattr__(model, "_compiled_steps", steps)  # a plain attribute, not a parameter
    return steps


class PromptCache:
    """A model cache plus the tokens it holds, reused across turns of one conversation.

    A new prompt that starts with (part of) the cached tokens only prefills the rest. With the
    fixed-capacity cache every decode step has the same shapes and runs as one compiled graph
    (CompiledSteps) instead of hundreds of separately dispatched operations.
    """

    def __init__(self, model: Model, kv_bits: Optional[int] = None, kv_group_size: int = 64):
        self.model, self.kv_bits, self.kv_group_size = model, kv_bits, kv_group_size
        self.cache = make_cache(model, kv_bits, kv_group_size)
        self.mtp_cache = self._fresh_mtp_cache()
        self.tokens: list[int] = []
        self.traced = False  # a routing trace records lazily inside the forward pass: run it uncompiled
        # offloaded experts: each MoE layer syncs on its routed indices to read the missing experts, which a
        # compiled graph cannot do, so an offloaded model decodes uncompiled
        self.offloaded = getattr(model, "offloader", None) is not None

    def _fresh_mtp_cache(self, depth: Optional[int] = None) -> list:
        """One empty fixed-capacity cache per drafting MTP module (the first `depth`; grown by `ensure`)."""
        args, dtype = self.model.args, activation_dtype(self.model)
        return [StaticKVCache(args, 1, 64, dtype) for _ in self.model.mtp[:depth]]

    def draft_with(self, depth: int) -> None:
        """Draft with the first `depth` MTP modules from the next call on."""
        if depth != len(self.mtp_cache):
            self.mtp_cache = self._fresh_mtp_cache(depth)

    @property
    def compiled(self) -> bool:
        return not (self.traced or self.offloaded) and isinstance(self.cache[0], StaticKVCache)

    def next_token(self, tokens: mx.array, sample) -> mx.array:
        """The decode step: `sample` of the logits for the token after `tokens` [B, L] (one compiled graph)."""
        if not self.compiled:
            return sample(self.model.logits(self.model.model(tokens, self.cache)[:, -1, :]))
        out, states = compiled_steps(self.model).next_token(sample)(tokens, [c.state for c in self.cache])
        self._store(self.cache, states)
        return out

    def draft(self, hidden: mx.array, ahead: mx.array) -> mx.array:
        """The first D drafts after a prompt, filling the MTP caches: module k runs on the prompt's positions j
        with the token t_{j+k+1} (`ahead`: t_{j+1} for every prompt position, then each module's draft)."""
        n, drafts = hidden.shape[1], []
        for k, cache in enumerate(self.mtp_cache):
            hidden, logits = self.model.mtp_step(hidden, ahead[:, k : k + n], k, cache, at=-1)
            drafts.append(mx.argmax(logits, axis=-1))
            ahead = mx.concatenate([ahead, drafts[-1][None]], axis=1)
        return mx.concatenate(drafts)

    @property
    def pipelined(self) -> bool:
        """Whether a speculative step can be queued before the previous one is read (the cache offsets
        are arrays); mlx-lm's quantized cache keeps a Python offset, so it is trimmed after a sync."""
        return isinstance(self.cache[0], StaticKVCache)

    def speculate(self, y: mx.array, drafts: mx.array, sample, compile: bool = True) -> tuple:
        """`speculative_step` on this cache, as one compiled graph where it can be (compile: `sample` is a
        fixed function of the logits, not one that reads the token history)."""
        if not (compile and self.compiled):
            return speculative_step(self.model, y, drafts, self.cache, self.mtp_cache, sample)
        out, states, mtp_states = compiled_steps(self.model).speculative(sample)(
            y, drafts, [c.state for c in self.cache], [c.state for c in self.mtp_cache]
        )
        self._store(self.cache, states)
        self._store(self.mtp_cache, mtp_states)
        return out

    @staticmethod
    def _store(caches: list, states: list) -> None:
        for c, state in zip(caches, states):
            c.state = state

    def prefill(self, tokens: mx.array, last_only: bool = False) -> mx.array:
        """Hidden states of a prompt chunk [B, L]. Runs on exact-length views of the cached prefix (no
        attention over the unwritten tail), then writes the new keys and values into the fixed buffers."""
        if not isinstance(self.cache[0], StaticKVCache):
            return self.model.model(tokens, self.cache, last_only=last_only)
        n = len(self.tokens)
        views = [KVCache() for _ in self.cache]
        for c, view in zip(self.cache, views):
            if n:
                view.update_and_fetch(c.state["keys"][..., :n, :], c.state["values"][..., :n, :])
        hidden = self.model.model(tokens, views, last_only=last_only)
        for c, view in zip(self.cache, views):
            c.state["offset"] = mx.array(n, mx.int32)
            c.update_and_fetch(view.keys[..., n : view.offset, :], view.values[..., n : view.offset, :])
        return hidden

    def ensure(self, new_tokens: int) -> None:
        """Room for `new_tokens` more positions (grown in steps of 64; outside the compiled step)."""
        need = -(-(len(self.tokens) + new_tokens + 2 * len(self.mtp_cache) + 2) // 64) * 64  # + a queued MTP step
        for c in self.cache + self.mtp_cache:
            if isinstance(c, StaticKVCache):
                c.ensure(need)

    def reuse(self, prompt: list[int]) -> list[int]:
        """Trim the cache to the longest common prefix (leaving at least one token) and return what to prefill."""
        common = 0
        for a, b in zip(self.tokens, prompt[:-1]):
            if a != b:
                break
            common += 1
        drop = len(self.tokens) - common
        if drop and not all(c.is_trimmable() for c in self.cache):
            self.cache, common, drop = make_cache(self.model, self.kv_bits, self.kv_group_size), 0, 0
        if drop:
            for c in self.cache:
                c.trim(drop)
        self.mtp_cache = self._fresh_mtp_cache(len(self.mtp_cache))  # MTP state restarts per call
        self.tokens = self.tokens[:common]
        return prompt[common:]


# ---- results ---------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    text: str = ""
    reasoning: str = ""
    answer: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    mtp_acceptance: Optional[float] = None
    mtp_drafted: int = 0
    mtp_accepted: int = 0
    expert_trace: Optional[ExpertTrace] = None
    offload: Optional[dict] = None  # expert offloading: hit rates, bytes read, stalls per layer (offloaded models)

    @property
    def generation_tokens(self) -> int:
        return len(self.tokens)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in (
            "text", "reasoning", "answer", "finish_reason", "prompt_tokens", "generation_tokens", "prompt_tps",
            "generation_tps", "peak_memory_gb", "mtp_acceptance", "mtp_drafted", "mtp_accepted",
        )}
        out["tokens"] = self.tokens
        out["expert_trace"] = self.expert_trace.to_dict() if self.expert_trace else None
        out["offload"] = self.offload
        return out


@dataclass
class Chunk:
    """One step of a stream: the new text split into reasoning and answer; `result` on the last chunk."""

    text: str
    reasoning: str
    answer: str
    tokens: list[int]
    result: Optional[GenerationResult] = None


# ---- the token loop ----------------------------------------------------------------------------------
def _logits(logits: mx.array) -> mx.array:
    """The identity 'sampler': a decode step that returns logits (for logits processors, applied after it)."""
    return logits


def _sample(logits: mx.array, history: mx.array, sampler, processors) -> mx.array:
    for p in processors:
        logits = p(history, logits)
    return sampler(logits)


def _plain_tokens(model, prompt, pc: PromptCache, sampler, processors, taker) -> Iterator[list[int]]:
    """Yields one token at a time; the next forward pass is queued before the current token is used."""
    history = mx.array(prompt)
    hidden = pc.prefill(mx.array(prompt)[None], last_only=True)
    y = _sample(model.logits(hidden[:, -1, :]), history[None], sampler, processors)
    mx.async_eval(y)
    position = len(prompt) - 1
    while True:
        if processors:  # the tokens so far, which only logits processors read: they run outside the graph
            history = mx.concatenate([history, y])
            next_y = _sample(pc.next_token(y[None], _logits), history[None], sampler, processors)
        else:
            next_y = pc.next_token(y[None], sampler)
        mx.async_eval(next_y)
        if taker:
            taker.take([position])
            position = 0
        yield [y.item()]
        y = next_y


def _mtp_tokens(model, prompt, pc: PromptCache, sampler, processors, taker, stats) -> Iterator[list[int]]:
    """MTP self-speculative decoding (batch 1): the D MTP modules draft t_{n+1} .. t_{n+D} (module k the one
    k + 1 places after the token it is given); the main model verifies [t_n, drafts] in one pass. The targets are
    always sampled from the main model's distribution and a draft kept only while it equals its target, so
    outputs are exactly those of plain decoding (greedy: token-identical; sampled: the same distribution).
    Drafts are the modules' argmaxes.

    A step is array arithmetic end to end (acceptance adjusts the cache offsets in the graph), so, as in
    plain decoding, step i + 1 is queued before step i's tokens are read, except when a logits processor
    needs the tokens or the cache cannot take array offsets.
    """
    depth = len(pc.mtp_cache)
    hidden = pc.prefill(mx.array(prompt)[None])  # [1, L, D], final-normed
    y = _sample(model.logits(hidden[:, -1, :]), mx.array(prompt)[None], sampler, processors)
    if taker:
        taker.take([len(prompt) - 1])
    drafts = pc.draft(hidden, mx.concatenate([mx.array(prompt[1:], mx.int32), y])[None])
    history = list(prompt)
    queued = pc.pipelined and not processors  # step i + 1 queued before step i is read

    def with_history(logits: mx.array) -> mx.array:
        """The targets one after another, each position's processors seeing the ones before it."""
        past, targets = mx.array(history)[None], []
        for j in range(depth + 1):
            targets.append(_sample(logits[j : j + 1], past, sampler, processors))
            past = mx.concatenate([past, targets[-1][None]], axis=1)
        return mx.concatenate(targets)

    def step(y: mx.array, drafts: mx.array):  # verifies positions n .. n + D
        if processors:
            return pc.speculate(y, drafts, with_history, compile=False)
        return pc.speculate(y, drafts, sampler)

    mx.eval(y, drafts)  # the MTP modules' pass over the prompt is prompt processing, done before the first token
    history.append(y.item())
    yield [history[-1]]
    current = step(y, drafts)
    mx.async_eval(current)
    while True:
        upcoming = step(*current[2:]) if queued else None
        if queued:
            mx.async_eval(upcoming)
        accepted = current[1].item()
        new = current[0].tolist()[: accepted + 1]
        stats["drafted"] += depth
        stats["accepted"] += accepted
        if taker:
            taker.take(list(range(accepted + 1)))
        history.extend(new)
        yield new
        current = upcoming if queued else step(*current[2:])
        if not queued:
            mx.async_eval(current)


def draft_depth(model: Model, mtp: Union[bool, int]) -> int:
    """How many MTP modules draft: all of them for `mtp=True`, else the first `mtp`."""
    depth = len(model.mtp) if mtp is True else int(mtp)
    if not model.mtp:
        raise ValueError("MTP decoding needs a model with an MTP module (num_nextn_predict_layers > 0)")
    if not 1 <= depth <= len(model.mtp):
        raise ValueError(f"mtp={mtp}: the model has {len(model.mtp)} MTP module(s); draft with 1 to {len(model.mtp)}")
    return depth


def generate_tokens(
    model: Model,
    prompt: list[int],
    max_tokens: int = 256,
    sampling: Optional[Sampling] = None,
    mtp: Union[bool, int] = False,
    stats: Optional[dict] = None,
    prompt_cache: Optional[PromptCache] = None,
) -> Iterator[list[int]]:
    """The raw token loop (no tokenizer, no stopping rule but max_tokens): yields lists of new token ids
    (MTP may yield several per step). `stats` receives MTP's drafted/accepted counts."""
    sampling = sampling or Sampling()
    pc = prompt_cache or PromptCache(model)
    if mtp:
        pc.draft_with(draft_depth(model, mtp))
    pc.ensure(len(prompt) + max_tokens)
    if mtp:
        stats = stats if stats is not None else {}
        stats.setdefault("drafted", 0)
        stats.setdefault("accepted", 0)
        steps = _mtp_tokens(model, prompt, pc, sampling.sampler(), sampling.processors(), None, stats)
    else:
        steps = _plain_tokens(model, prompt, pc, sampling.sampler(), sampling.processors(), None)
    produced = 0
    for new in steps:
        yield new[: max_tokens - produced]
        produced += len(new)
        if produced >= max_tokens:
            return


def stream_generate(
    model: Model,
    tokenizer,
    prompt: Union[str, list[int]],
    max_tokens: int = 256,
    sampling: Optional[Sampling] = None,
    stop: Sequence[str] = (),
    prompt_cache: Optional[PromptCache] = None,
    mtp: Union[bool, int] = False,
    trace: bool = False,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
) -> Iterator[Chunk]:
    """Generate from a prompt (text with the chat template applied, or token ids), chunk by chunk.

    The final chunk carries the GenerationResult (full text, reasoning, answer, speed, memory, MTP
    acceptance, expert trace when `trace`). Stops at an EOS token, a stop string (cut off) or max_tokens.
    """
    sampling = sampling or Sampling()
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    text_prompt = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    ids = tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    if prompt_cache is None:
        prompt_cache = PromptCache(model, kv_bits, kv_group_size)
    if mtp:
        prompt_cache.draft_with(draft_depth(model, mtp))
    todo = prompt_cache.reuse(ids)
    prompt_cache.ensure(len(todo) + max_tokens)
    prompt_cache.traced = trace

    sampler, processors = sampling.sampler(), sampling.processors()
    taker = _TraceTaker(model) if trace else None
    stats = {"drafted": 0, "accepted": 0}
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    parser = ReasoningParser(prompt_ends_in_think=text_prompt.rstrip().endswith(THINK))
    detok = tokenizer.detokenizer
    detok.reset()
    result = GenerationResult(prompt_tokens=len(ids))

    offloader = getattr(model, "offloader", None)
    if offloader is not None:
        offloader.reset_stats()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    loop = _mtp_tokens if mtp else _plain_tokens
    steps = loop(model, todo, prompt_cache, sampler, processors, taker, *([stats] if mtp else []))
    text, cut = "", False
    try:
        for new in steps:
            if not result.tokens and result.prompt_tps == 0.0:
                result.prompt_tps = len(todo) / (time.perf_counter() - tic)
                tic = time.perf_counter()
            emitted = []
            for tok in new:
                if tok in eos:
                    result.finish_reason = "stop"
                    break
                result.tokens.append(tok)
                emitted.append(tok)
                detok.add_token(tok)
                if len(result.tokens) >= max_tokens:
                    result.finish_reason = "length"
                    break
            segment = detok.last_segment
            text += segment
            hit = next((s for s in stop if s and s in text), None)
            if hit:
                keep = text.index(hit)
                segment = segment[: max(0, len(segment) - (len(text) - keep))]
                text, result.finish_reason, cut = text[:keep], "stop", True
            delta = parser.feed(segment)
            if segment or emitted:
                yield Chunk(segment, delta.reasoning, delta.answer, emitted)
            if result.finish_reason:
                break
    finally:
        steps.close()
        model.set_routing_trace(None)
        prompt_cache.tokens = ids + result.tokens
        _sync_cache_length(prompt_cache)
    if not cut:
        detok.finalize()
        tail = detok.last_segment
        text += tail
        last = parser.feed(tail)
    else:
        tail, last = "", parser.feed("")
    rest = parser.finish()
    result.generation_tps = len(result.tokens) / max(time.perf_counter() - tic, 1e-9)
    result.peak_memory_gb = mx.get_peak_memory() / 1e9
    result.text, result.reasoning, result.answer = text, parser.reasoning, parser.answer
    if mtp:
        result.mtp_drafted, result.mtp_accepted = stats["drafted"], stats["accepted"]
        result.mtp_acceptance = stats["accepted"] / max(stats["drafted"], 1)
    result.expert_trace = taker.trace if taker else None
    result.offload = offloader.stats() if offloader is not None else None
    yield Chunk(tail, last.reasoning + rest.reasoning, last.answer + rest.answer, [], result)


def _sync_cache_length(pc: PromptCache) -> None:
    """The token loop runs one step ahead: trim the cache to exactly the tokens it has seen."""
    extra = int(pc.cache[0].offset) - len(pc.tokens)
    if extra > 0:
        for c in pc.cache:
            c.trim(extra)
    elif extra < 0:  # the last generated token was never fed back
        pc.tokens = pc.tokens[: int(pc.cache[0].offset)]


def generate(model: Model, tokenizer, prompt, **kwargs) -> GenerationResult:
    """stream_generate, collected."""
    for chunk in stream_generate(model, tokenizer, prompt, **kwargs):
        if chunk.result is not None:
            return chunk.result
    raise RuntimeError("generation ended without a result")


def batch_generate(
    model: Model,
    tokenizer,
    prompts: Sequence[Union[str, list[int]]],
    n: int = 1,
    max_tokens: int = 256,
    sampling: Optional[Sampling] = None,
    stop: Sequence[str] = (),
) -> list[GenerationResult]:
    """Decode P prompts x n samples together (rows of one batch; the n samples of a prompt share its
    prefill). Returns P * n results, prompt by prompt. Used by GRPO rollouts and the benchmarks."""
    sampling = sampling or Sampling()
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
    ids = [tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p) for p in prompts]
    longest = max(len(i) for i in ids)
    padding = [longest - len(i) for i in ids]
    cache = [BatchKVCache(padding) for _ in model.layers]
    sampler, processors = sampling.sampler(), sampling.processors()
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])

    mx.reset_peak_memory()
    tic = time.perf_counter()
    padded = mx.array([[0] * pad + i for pad, i in zip(padding, ids)])
    logits = model.logits(model.model(padded, cache, last_only=True)[:, -1, :])
    rows = mx.array([p for p in range(len(ids)) for _ in range(n)])
    if n > 1:
        for c in cache:
            c.filter(rows)
        logits = logits[rows]
    y = _sample(logits, mx.zeros((len(rows), 0), mx.int32), sampler, processors)
    mx.eval(y)
    prompt_time = time.perf_counter() - tic
    tic = time.perf_counter()

    rows_list = rows.tolist()
    tokens: list[list[int]] = [[] for _ in rows_list]
    done = [None] * len(rows_list)
    active = list(range(len(rows_list)))  # the result row of each batch row: finished rows leave the batch
    history = y[:, None]
    for _ in range(max_tokens):
        for r, tok in zip(active, y.tolist()):
            if tok in eos:
                done[r] = "stop"
                continue
            tokens[r].append(tok)
            if stop and any(s in tokenizer.decode(tokens[r][-32:]) for s in stop):
                done[r] = "stop"
            elif len(tokens[r]) >= max_tokens:
                done[r] = "length"
        if all(done):
            break
        alive = [i for i, r in enumerate(active) if not done[r]]
        if len(alive) < len(active):
            keep = mx.array(alive)
            for c in cache:
                c.filter(keep)
            y, history, active = y[keep], history[keep], [active[i] for i in alive]
        logits = model(y[:, None], cache)[:, -1, :]
        y = _sample(logits, history, sampler, processors)
        history = mx.concatenate([history, y[:, None]], axis=1)
        mx.async_eval(y)
    elapsed = time.perf_counter() - tic

    total = sum(len(t) for t in tokens)
    results = []
    for r, p in enumerate(rows_list):
        text = tokenizer.decode(tokens[r])
        reason = done[r] or "length"
        if reason == "stop" and stop:
            hit = min((text.index(s) for s in stop if s in text), default=len(text))
            text = text[:hit]
        parser = ReasoningParser(prompt_ends_in_think=texts[p].rstrip().endswith(THINK))
        parser.feed(text)
        parser.finish()
        results.append(GenerationResult(
            text=text, reasoning=parser.reasoning, answer=parser.answer, tokens=tokens[r], finish_reason=reason,
            prompt_tokens=len(ids[p]), prompt_tps=sum(len(i) for i in ids) / prompt_time,
            generation_tps=total / max(elapsed, 1e-9), peak_memory_gb=mx.get_peak_memory() / 1e9,
        ))
    return results
