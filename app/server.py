"""`mlx-deepseek serve`: an OpenAI-compatible HTTP API on the mlx_deepseek generation library.

Endpoints: `POST /v1/chat/completions` (the reasoning in `reasoning_content`, the answer in `content`, as
DeepSeek's own API does), `POST /v1/completions` (a raw prompt, no template), `GET /v1/models`.

MLX is not thread-safe, so one worker thread owns the model and serves queued requests one at a time; the
chunks it produces reach the request's coroutine through an asyncio queue, so the event loop never blocks.
A client that goes away sets its request's cancelled flag and the worker stops that generation at the next
token. A few PromptCaches are kept (least recently used dropped); a request reuses the one sharing the longest
token prefix with its prompt, so the next turn of a conversation only prefills what is new.

Safe by default: loopback only unless told otherwise, an optional API key checked on every request, limits on
the request body and on max_tokens; every bad request is a 400 in OpenAI's error format, never a crash.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlx_deepseek.chat import apply_chat_template
from mlx_deepseek.generate import PromptCache, Sampling, stream_generate

DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.6, 0.95  # DeepSeek's recommendation for R1-style models
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP = 16
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ---- errors ----------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(body: dict, name: str, default, lo: float, hi: float):
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or not lo <= v <= hi:
        raise APIError(f"'{name}' must be a number between {lo} and {hi}; got {v!r}", param=name)
    return float(v)


def _integer(body: dict, name: str, default, lo: int = 0):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or v < lo:
        raise APIError(f"'{name}' must be an integer >= {lo}; got {v!r}", param=name)
    return v


def _streaming(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage) of a request body."""
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError("'stream_options' must be an object", param="stream_options")
    return _boolean(body, "stream"), _boolean(options or {}, "include_usage")


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(f"'{name}' must be a boolean; got {v!r}", param=name)
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(v) > MAX_STOP:
        raise APIError(f"'stop' must be a string or a list of at most {MAX_STOP} strings", param="stop")
    return [s for s in v if s]


def _text_content(content, i: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                               "supported", param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise APIError("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise APIError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(f"messages[{i}].role {role!r}: expected one of {sorted(ROLES)}", param=f"messages[{i}].role")
        if m.get("content") is None and role != "assistant":
            raise APIError(f"messages[{i}].content is required", param=f"messages[{i}].content")
        out.append({"role": ROLES[role], "content": _text_content(m.get("content"), i)})
    if not any(m["role"] == "user" for m in out):
        raise APIError("'messages' needs at least one user message", param="messages")
    return out


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---- the worker ------------------------------------------------------------------------------------
@dataclass
class Job:
    """One generation request, as handed to the worker thread."""

    prompt: str
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    trace: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    checked: float = 0.0  # when the client's connection was last looked at

    def put(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()


class Worker:
    """The one thread that runs the model. Jobs are served in arrival order, one at a time."""

    def __init__(self, model, tokenizer, cache_slots: int = 4):
        self.model, self.tokenizer = model, tokenizer
        self.cache_slots = cache_slots
        self.caches: list[PromptCache] = []  # least recently used first
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        # per served job: prompt tokens, tokens reused from a cache, tokens generated, whether it was cancelled
        self.log: "collections.deque[dict]" = collections.deque(maxlen=64)
        self.thread = threading.Thread(target=self._run, name="mlx-deepseek-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)

    def _cache_for(self, ids: list[int]) -> PromptCache:
        """The cache sharing the longest prefix with `ids` (moved to the most recent end), or a new one."""
        def common(pc: PromptCache) -> int:
            return _common_prefix(pc.tokens, ids)

        best = max(self.caches, key=common, default=None)
        if best is not None and common(best) > 0:
            self.caches.remove(best)
        else:
            best = PromptCache(self.model)
            if len(self.caches) >= self.cache_slots:
                self.caches.pop(0)
        self.caches.append(best)
        return best

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            pc = None
            try:
                ids = self.tokenizer.encode(job.prompt, add_special_tokens=False)
                pc = self._cache_for(ids)
                entry = {"prompt_tokens": len(ids), "reused": _common_prefix(pc.tokens, ids[:-1]), "tokens": 0,
                         "cancelled": False}
                stream = stream_generate(self.model, self.tokenizer, job.prompt, max_tokens=job.max_tokens,
                                         sampling=job.sampling, stop=job.stop, prompt_cache=pc, trace=job.trace)
                try:
                    for chunk in stream:
                        if job.cancelled.is_set():
                            entry["cancelled"] = True
                            break
                        entry["tokens"] += len(chunk.tokens)
                        job.put("chunk", chunk)
                finally:
                    stream.close()  # stops the token loop and leaves the cache consistent
                self.log.append(entry)
                job.put("end")
            except Exception as e:  # never let one request take the worker down
                if pc is not None and pc in self.caches:
                    self.caches.remove(pc)  # its state is unknown now
                job.put("error", e)


# ---- the server ------------------------------------------------------------------------------------
@dataclass
class ServerConfig:
    model_id: str = "nano-r1"
    api_key: Optional[str] = None
    max_tokens_limit: int = 4096
    max_request_bytes: int = 1 << 20
    cache_slots: int = 4


def _usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: Optional[int] = None) -> dict:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(model, tokenizer, config: Optional[ServerConfig] = None) -> FastAPI:
    """The FastAPI app serving `model` (an mlx_deepseek Model) and its tokenizer."""
    cfg = config or ServerConfig()
    worker = Worker(model, tokenizer, cfg.cache_slots)
    context = int(getattr(model.args, "max_position_embeddings", 0) or 0)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="mlx-deepseek", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker, app.state.config = worker, cfg

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(f"{request.method} {request.url.path}: {e.detail}", e.status_code, type=kind).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        return APIError(f"internal error: {type(e).__name__}: {e}", 500, type="server_error").response()

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
            raise APIError("Incorrect or missing API key (send 'Authorization: Bearer <key>').", 401,
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        check_key(request)
        declared = request.headers.get("content-length")
        too_big = APIError(f"the request body is larger than the server's limit of {cfg.max_request_bytes} bytes",
                           code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_request_bytes:
            raise too_big
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > cfg.max_request_bytes:
                raise too_big
        try:
            body = json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        model_name = body.get("model")
        if model_name is not None and not isinstance(model_name, str):
            raise APIError("'model' must be a string", param="model")
        return body

    def common(body: dict, prompt: str, default_max_tokens: Optional[int]) -> Job:
        if _integer(body, "n", 1, lo=1) != 1:
            raise APIError("only n=1 is supported", param="n")
        if body.get("logprobs"):
            raise APIError("logprobs are not supported", param="logprobs")
        max_tokens = _integer(body, "max_completion_tokens", None, lo=1)
        if max_tokens is None:
            max_tokens = _integer(body, "max_tokens", None, lo=1)
        if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
            raise APIError(f"max_tokens={max_tokens} is over this server's limit of {cfg.max_tokens_limit}",
                           param="max_tokens")
        temperature = _number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0)
        top_p = _number(body, "top_p", DEFAULT_TOP_P, 0.0, 1.0)
        top_k = _integer(body, "top_k", 0)
        min_p = _number(body, "min_p", 0.0, 0.0, 1.0)
        rep = _number(body, "repetition_penalty", None, 0.0, 10.0)
        seed = _integer(body, "seed", None, lo=-(2**63))
        stop = _stop(body)
        trace = _boolean(body, "expert_trace")
        n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
        if n_prompt == 0:
            raise APIError("the prompt is empty", param="prompt")
        room = context - n_prompt if context else cfg.max_tokens_limit
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise APIError(
                f"this model's context is {context} tokens; the prompt has {n_prompt} and max_tokens "
                f"asks for {max_tokens or 1} more", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max_tokens or cfg.max_tokens_limit, cfg.max_tokens_limit, room)
        sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=rep, seed=seed % (2**32) if seed is not None else None)
        return Job(prompt, max_tokens, sampling, stop, trace, asyncio.get_running_loop())

    async def next_event(job: Job, request: Request):
        """The worker's next (kind, value) for this job; cancels the job if the client went away."""
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                event = None
            now = time.monotonic()
            if event is None or now - job.checked > 0.25:  # look at the connection about 4 times a second
                job.checked = now
                if await request.is_disconnected():
                    job.cancelled.set()
                    raise ClientGone()
            if event is not None:
                return event

    async def events(job: Job, request: Request) -> AsyncIterator:
        """Chunks until the end; a worker error is raised as a 400 (ValueError) or 500."""
        worker.submit(job)
        try:
            while True:
                kind, value = await next_event(job, request)
                if kind == "end":
                    return
                if kind == "error":
                    if isinstance(value, ValueError):
                        raise APIError(str(value))
                    raise APIError(f"generation failed: {type(value).__name__}: {value}", 500, type="server_error")
                yield value
        finally:
            job.cancelled.set()  # a no-op after the end; stops the worker after a disconnect

    async def first_then_rest(job: Job, request: Request):
        """Start the job and wait for its first chunk, so errors before any output are plain HTTP errors."""
        stream = events(job, request)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        return first, stream

    def event_stream(job: Job, first, rest, head: dict, include_usage: bool, choice, usage,
                     opening: Optional[dict] = None) -> StreamingResponse:
        """A streamed job as server-sent events: `opening` first (if any), then one frame per chunk with the
        choice fields `choice(chunk)` gives (None: nothing to send), a last frame with `choice(None)`, the
        finish reason (and the expert trace when asked), the usage object if asked, then [DONE]. An error
        mid-stream becomes an error event; a client that leaves stops the worker."""

        def frame(fields: dict, finish=None, **extra) -> str:
            obj = {**head, "choices": [{"index": 0, **fields, "logprobs": None, "finish_reason": finish}], **extra}
            if include_usage:
                obj["usage"] = None
            return _sse(obj)

        async def sse():
            if opening is not None:
                yield frame(opening)
            chunk, result = first, None
            try:
                while chunk is not None:
                    if chunk.result is not None:
                        result = chunk.result
                    fields = choice(chunk)
                    if fields:
                        yield frame(fields)
                    chunk = await rest.__anext__()
            except (StopAsyncIteration, ClientGone):
                if result is None:
                    return
            except APIError as e:
                yield _sse(e.body())
                yield "data: [DONE]\n\n"
                return
            finally:
                job.cancelled.set()  # a no-op after the end; stops the worker when the client left mid-stream
            extra = {"expert_trace": trace_dict(result)} if job.trace else {}
            yield frame(choice(None), result.finish_reason, **extra)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": usage(result)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collect(job: Job, request: Request):
        """The job's GenerationResult, or None when the client left first."""
        result = None
        try:
            async for chunk in events(job, request):
                result = chunk.result or result
        except ClientGone:
            return None
        return result

    async def respond(job: Job, request: Request, stream_it: bool, rid: str, objects: tuple, whole, choice,
                      include_usage: bool, usage, opening: Optional[dict] = None):
        """A job's answer: one object (`whole(result)`: the choice's fields; usage, and the expert trace when
        asked) or, streamed, `event_stream`'s events; `objects` names the object of each. A client that left
        first gets 499."""
        head = {"id": rid, "object": objects[0], "created": int(time.time()), "model": cfg.model_id}
        if not stream_it:
            result = await collect(job, request)
            if result is None:
                return Response(status_code=499)  # nobody is listening any more
            out = {**head, "choices": [{"index": 0, **whole(result), "logprobs": None,
                                        "finish_reason": result.finish_reason}], "usage": usage(result)}
            if job.trace:
                out["expert_trace"] = trace_dict(result)
            return out
        try:
            first, rest = await first_then_rest(job, request)
        except ClientGone:
            return Response(status_code=499)
        return event_stream(job, first, rest, {**head, "object": objects[1]}, include_usage, choice, usage,
                            opening=opening)

    def reasoning_tokens(result) -> int:
        if not result.reasoning:
            return 0
        return min(len(tokenizer.encode(result.reasoning, add_special_tokens=False)), result.generation_tokens)

    def trace_dict(result):
        return result.expert_trace.to_dict() if result.expert_trace is not None else None

    # ---- endpoints -----------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [
            {"id": cfg.model_id, "object": "model", "created": created, "owned_by": "mlx-deepseek"}]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_key(request)
        if model_id != cfg.model_id:
            raise APIError(f"the model {model_id!r} does not exist; this server serves {cfg.model_id!r}", 404,
                           param="model", code="model_not_found")
        return {"id": cfg.model_id, "object": "model", "created": created, "owned_by": "mlx-deepseek"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        messages = _messages(body)
        stream_it, include_usage = _streaming(body)
        if body.get("tools"):
            raise APIError("tool calling is not supported by this server", param="tools")
        try:
            prompt = apply_chat_template(tokenizer, messages, model.args.model_type)
        except Exception as e:  # a template that rejects these messages
            raise APIError(f"the chat template rejected the messages: {e}", param="messages") from None
        job = common(body, prompt, None)

        def message(result) -> dict:
            return {"message": {"role": "assistant", "content": result.answer,
                                "reasoning_content": result.reasoning}}

        def choice(chunk) -> Optional[dict]:
            if chunk is None:
                return {"delta": {}}
            delta = {"reasoning_content": chunk.reasoning, "content": chunk.answer}
            delta = {k: v for k, v in delta.items() if v}
            return {"delta": delta} if delta else None

        return await respond(job, request, stream_it, f"chatcmpl-{uuid.uuid4().hex}",
                             ("chat.completion", "chat.completion.chunk"), message, choice, include_usage,
                             lambda r: _usage(r.prompt_tokens, r.generation_tokens, reasoning_tokens(r)),
                             opening={"delta": {"role": "assistant", "content": ""}})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if prompt is None:
            raise APIError("'prompt' is required", param="prompt", code="missing_required_parameter")
        if not isinstance(prompt, str):
            raise APIError("'prompt' must be a string (one prompt per request)", param="prompt")
        if body.get("echo"):
            raise APIError("echo is not supported", param="echo")
        stream_it, include_usage = _streaming(body)
        job = common(body, prompt, COMPLETIONS_DEFAULT_MAX_TOKENS)

        def choice(chunk) -> Optional[dict]:
            if chunk is None:
                return {"text": ""}
            return {"text": chunk.text} if chunk.text else None

        return await respond(job, request, stream_it, f"cmpl-{uuid.uuid4().hex}", ("text_completion",) * 2,
                             lambda r: {"text": r.text}, choice, include_usage,
                             lambda r: _usage(r.prompt_tokens, r.generation_tokens))

    return app


def model_id_for(model_path: Optional[str]) -> str:
    """The id /v1/models reports: the hub id or folder name given, or the bundled model's name."""
    if model_path is None:
        return "nano-r1"
    from pathlib import Path

    p = Path(model_path).expanduser()
    return p.name if p.exists() else str(model_path)


def serve(model_path: Optional[str] = None, host: str = "127.0.0.1", port: int = 8080, api_key: Optional[str] = None,
          max_tokens_limit: int = 4096, max_request_bytes: int = 1 << 20, log_level: str = "info",
          expert_memory=None, offload: Optional[dict] = None) -> None:
    """Load the model and serve it until interrupted (what `mlx-deepseek serve` runs); `expert_memory` and
    `offload` offload the routed experts (see mlx_deepseek.load)."""
    import uvicorn

    from mlx_deepseek import load

    if max_tokens_limit < 1 or max_request_bytes < 1:
        raise ValueError("--max-tokens-limit and --max-request-bytes must be positive")
    model, tokenizer = load(model_path, expert_memory=expert_memory, offload=offload)
    config = ServerConfig(model_id_for(model_path), api_key, max_tokens_limit, max_request_bytes)
    app = create_app(model, tokenizer, config)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this address can use the model")
    print(f"serving {config.model_id} at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
