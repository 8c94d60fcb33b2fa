"""The app's hold on the model: one loaded model shared by every browser session, one generation at a time,
and per-session state (a PromptCache reused across turns, a stop flag, the last answer's expert trace).

Gradio's queue already runs the generating events one at a time (they share one concurrency id, limit 1);
the engine adds a lock around each model step and closes a stream that a cancelled request left open before
the next one starts, so two streams never interleave on the model (its routing trace is model-wide)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

BUNDLED_LABEL = "nano-r1 (bundled)"
MAX_INPUT_CHARS = 16_000  # a message longer than this is refused before it is tokenized


class InputTooLong(ValueError):
    """The conversation does not fit the model's context: the message says what to do."""


@dataclass
class Settings:
    system: str = ""
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 512
    seed: Optional[int] = None
    mtp: bool = True


class Session:
    """One browser session's state (gr.State makes one per session by calling this class)."""

    def __init__(self):
        self.stop = threading.Event()
        self.cache = None  # PromptCache of the engine's current model
        self.cache_version = -1
        self.result = None  # GenerationResult of the last answer
        self.trace = None  # its ExpertTrace
        self.token_texts: list[str] = []
        self.reused = 0

    def __deepcopy__(self, memo):  # gr.State deep-copies its default: a fresh session
        return Session()

    def reset(self) -> None:
        self.cache, self.cache_version = None, -1
        self.result, self.trace, self.token_texts, self.reused = None, None, [], 0


def message_text(content) -> str:
    """A chat message's text: Gradio gives a string or a list of parts ({'type': 'text', 'text': ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(c) for c in content)
    return "" if content is None else str(content)


def _get(m, key, default=None):
    return m.get(key, default) if isinstance(m, dict) else getattr(m, key, default)


def to_model_messages(history: list, system: str = "") -> list[dict]:
    """The chatbot's messages as the model sees them: the system prompt, the user turns and the answers.
    Thinking blocks (and notes such as errors: every message with a title) are left out, so earlier
    reasoning is never fed back; consecutive assistant messages join into one turn."""
    out = [{"role": "system", "content": system}] if system.strip() else []
    for m in history or []:
        role, meta = _get(m, "role"), _get(m, "metadata") or {}
        if role == "assistant" and meta.get("title"):
            continue
        text = message_text(_get(m, "content"))
        if role == "assistant" and out and out[-1]["role"] == "assistant":
            out[-1]["content"] += text
        elif role in ("user", "assistant"):
            out.append({"role": role, "content": text})
    return out


def local_models() -> list[tuple[str, str]]:
    """(label, folder) of the bundled model and every hub-cache entry whose config.json names a supported family."""
    import json

    from mlx_deepseek.config import FAMILIES
    from mlx_deepseek.loading import BUNDLED

    found = [(BUNDLED_LABEL, str(BUNDLED))]
    try:
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir()
    except Exception:  # no cache folder yet, or an unreadable one
        return found
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)[:1]:
            config = Path(rev.snapshot_path) / "config.json"
            try:
                kind = json.loads(config.read_text()).get("model_type")
            except (OSError, ValueError):
                continue
            if kind in FAMILIES:
                found.append((f"{repo.repo_id} (hub cache)", str(rev.snapshot_path)))
    return found


class Engine:
    """The loaded model, its tokenizer and describe() card; generation one stream at a time."""

    def __init__(self, model: Optional[str] = None, expert_memory=None, offload: Optional[dict] = None):
        self.expert_memory, self.offload = expert_memory, offload  # offloading for every MoE model loaded
        self.lock = threading.RLock()
        self.version = 0
        self._active: Optional[Iterator] = None
        self.model = self.tokenizer = self.info = self.folder = None
        self.load(model)

    def load(self, model: Optional[str] = None) -> dict:
        """Load a folder, a hub id or None (the bundled model); the old model stays if this fails."""
        from mlx_deepseek import load
        from mlx_deepseek.config import ModelArgs
        from mlx_deepseek.info import describe
        from mlx_deepseek.loading import resolve

        folder = resolve(model or None)
        info = describe(folder)
        moe = bool(ModelArgs.from_file(folder).n_routed_experts)  # a dense model has no experts to offload
        new_model, tokenizer = load(folder, expert_memory=self.expert_memory if moe else None, offload=self.offload)
        with self.lock:
            self._close_active()
            self.model, self.tokenizer, self.info, self.folder = new_model, tokenizer, info, folder
            self.version += 1
        return info

    @property
    def context(self) -> int:
        return int(self.model.args.max_position_embeddings)

    @property
    def has_mtp(self) -> bool:
        return bool(self.model.mtp)

    @property
    def mtp_pays(self) -> bool:
        """Whether MTP drafting speeds decoding up here: on a GPU (nano-r1, H200: 2.47x with its four modules);
        on the CPU a verification pass costs about what its tokens cost one by one (0.59x), so it starts off."""
        import mlx.core as mx

        return self.has_mtp and mx.default_device() != mx.cpu

    @property
    def n_shared(self) -> int:
        return int(self.model.args.n_shared_experts or 0) if self.model.args.n_routed_experts else 0

    @property
    def dense_layers(self) -> list[int]:
        a = self.model.args
        return [i for i in range(a.num_hidden_layers) if not a.is_moe_layer(i)] if a.n_routed_experts else []

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()  # runs stream_generate's cleanup: routing trace detached, cache synced
            self._active = None

    def prompt(self, messages: list[dict]) -> tuple[str, list[int]]:
        from mlx_deepseek.chat import apply_chat_template

        text = apply_chat_template(self.tokenizer, messages, self.model.args.model_type)
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    def check_length(self, user_text: str, n_prompt: int, max_tokens: int) -> int:
        """The max tokens that fit the context after this prompt; raises InputTooLong when nothing fits."""
        if len(user_text) > MAX_INPUT_CHARS:
            raise InputTooLong(
                f"Your message is {len(user_text):,} characters; the app accepts at most {MAX_INPUT_CHARS:,}. Shorten it."
            )
        room = self.context - n_prompt
        if room < 1:
            raise InputTooLong(
                f"The conversation is {n_prompt:,} tokens with your message, more than this model's context of "
                f"{self.context:,} tokens. Shorten the message, or press Clear to start a new conversation."
            )
        return min(max_tokens, room)

    def stream(self, session: Session, prompt_ids: list[int], settings: Settings, max_tokens: int):
        """Chunks of one answer; each model step under the lock, the session's PromptCache reused."""
        from mlx_deepseek.generate import PromptCache, Sampling, stream_generate

        with self.lock:
            self._close_active()
            if session.cache is None or session.cache_version != self.version:
                session.cache, session.cache_version = PromptCache(self.model), self.version
            session.reused = _common_prefix(session.cache.tokens, prompt_ids)
            sampling = Sampling(temperature=float(settings.temperature), top_p=float(settings.top_p),
                                seed=None if settings.seed is None else int(settings.seed))
            gen = stream_generate(
                self.model, self.tokenizer, prompt_ids, max_tokens=max_tokens, sampling=sampling,
                prompt_cache=session.cache, mtp=bool(settings.mtp) and self.has_mtp, trace=True,
            )
            self._active = gen
        try:
            while True:
                with self.lock:
                    if self._active is not gen:  # closed by a newer request or a model switch
                        return
                    try:
                        chunk = next(gen)
                    except StopIteration:
                        self._active = None
                        return
                    except BaseException:
                        self._active = None
                        session.cache = None  # its state is unknown after a failure
                        raise
                yield chunk
        finally:
            with self.lock:
                if self._active is gen:
                    self._close_active()

    def token_texts(self, tokens: list[int]) -> list[str]:
        """Each generated token's text as it reads in the answer (decoded in context, so word-initial
        spaces survive; prefix differences, since one character may take several tokens)."""
        out, before = [], ""
        for i in range(len(tokens)):
            text = self.tokenizer.decode(tokens[: i + 1])
            out.append(text[len(before):] if text.startswith(before) else text[-1:])
            before = text
        return out


def _common_prefix(cached: list[int], prompt: list[int]) -> int:
    n = 0
    for a, b in zip(cached, prompt[:-1]):
        if a != b:
            break
        n += 1
    return n


def now() -> float:
    return time.perf_counter()
