"""``kvpipe serve``: an OpenAI-compatible HTTP server around one transformers model with kvpipe as its KV cache.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream`` as server-sent
events; ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``), ``POST /tokenize``, ``GET /health``,
``GET /metrics`` (Prometheus) and ``GET /kvpipe/stats`` (the cache's counters as JSON, for ``kvpipe inspect
--url``).

One model, one request at a time: a single engine thread takes jobs from a FIFO queue and runs them to the end,
so concurrent requests wait their turn and never share a KV cache. The HTTP event loop never runs the model; the
engine thread hands text back to it through a bounded memory object stream (one item per generated token at
most, so it never fills). Bad requests get OpenAI-style JSON errors with status 400 (404 for an unknown model).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from kvpipe.errors import ConfigError
from kvpipe.integrations.transformers import CachedLM, GenerationResult, SamplingParams, chat_prompt_ids
from kvpipe.serve.metrics import ServeMetrics, render_prometheus

if TYPE_CHECKING:
    from kvpipe.api import Cache

__all__ = ["ApiError", "Engine", "create_app"]

log = logging.getLogger(__name__)

_DEFAULT_CHAT_MAX_TOKENS = 256


class ApiError(Exception):
    """An error returned to the client as OpenAI-style JSON."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type_, code

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    """``stream_options`` of a request."""

    include_usage: bool = False


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    logprobs: Any = None
    user: str | None = None


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


class ChatMessage(BaseModel):
    """One chat message (text content, or a list of text parts)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: a prompt or chat messages."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


# ---------------------------------------------------------------------------------------------------- engine
@attrs.define(eq=False)
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    req_id: str
    send: MemoryObjectSendStream[tuple[str, Any]]
    token: Any
    cancelled: threading.Event = attrs.field(factory=threading.Event)


class _Aborted(Exception):
    """The client went away: stop generating."""


@attrs.define(eq=False)
class Engine:
    """The one thread that runs the model, a FIFO of jobs in front of it, and the serve metrics."""

    lm: CachedLM
    metrics: ServeMetrics = attrs.field(factory=ServeMetrics)
    _jobs: queue.Queue[_Job | None] = attrs.field(factory=queue.Queue)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvpipe-serve-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Let the current job finish, then stop the thread."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    @property
    def queue_depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return self._jobs.qsize()

    def submit(self, prompt_ids: list[int], params: SamplingParams, req_id: str
               ) -> tuple[MemoryObjectReceiveStream[tuple[str, Any]], Callable[[], None]]:
        """Queue a generation; returns the stream of its events (``("text", str)`` ..., then ``("done",
        GenerationResult)`` or ``("error", message)``) and a function that cancels it. Call from the event loop."""
        # One item per generated token at most, plus the tail and the final event: a send never waits.
        send, recv = anyio.create_memory_object_stream[tuple[str, Any]](params.max_new_tokens + 4)
        job = _Job(prompt_ids, params, req_id, send, anyio.lowlevel.current_token())
        self._jobs.put(job)
        return recv, job.cancelled.set

    def _post(self, job: _Job, item: tuple[str, Any]) -> None:
        if job.cancelled.is_set():
            raise _Aborted
        try:
            anyio.from_thread.run_sync(job.send.send_nowait, item, token=job.token)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, RuntimeError):
            # Receiver closed (client gone) or the event loop has stopped.
            job.cancelled.set()
            raise _Aborted from None

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            try:
                res = self.lm.generate(job.prompt_ids, job.params, req_id=job.req_id,
                                       on_text=lambda text, j=job: self._post(j, ("text", text)))  # type: ignore[misc]
                self.metrics.observe_generation(
                    prompt_tokens=res.prompt_tokens, generated_tokens=len(res.token_ids), hit_tokens=res.hit_tokens,
                    hits_by_tier=res.hits_by_tier, stored_tokens=res.stored_tokens, ttft_s=res.ttft_s)
                log.info("Reqid: %s, prompt %d tokens (kvpipe hit %d %s), TTFT %.3f s, %d tokens generated in "
                         "%.3f s, finish %s", job.req_id, res.prompt_tokens, res.hit_tokens, res.hits_by_tier or "",
                         res.ttft_s, len(res.token_ids), res.total_s, res.finish_reason)
                self._post(job, ("done", res))
            except _Aborted:
                log.info("Reqid: %s: client disconnected, generation stopped", job.req_id)
            except Exception as exc:  # a bug or a model failure: report it to this client, keep serving others
                log.exception("Reqid: %s: generation failed", job.req_id)
                try:
                    self._post(job, ("error", f"generation failed: {type(exc).__name__}: {exc}"))
                except _Aborted:
                    pass


# ---------------------------------------------------------------------------------------------------- helpers
def _stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if len(items) > 4:
        raise ApiError("stop: at most 4 stop sequences are allowed", param="stop")
    return tuple(s for s in items if s)


@attrs.define(eq=False)
class _Served:
    engine: Engine
    model_id: str
    cache: Cache | None
    max_context: int
    created: int = attrs.field(factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Any:
        return self.engine.lm.tokenizer

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.model_id, ""):
            raise ApiError(f"The model `{model}` does not exist.", status=404, param="model",
                           type_="NotFoundError", code="model_not_found")

    def params(self, req: _GenerationRequest, prompt_len: int, max_tokens: int | None, default_max: int
               ) -> SamplingParams:
        if req.n != 1:
            raise ApiError("n: only n=1 is supported", param="n")
        if req.logprobs not in (None, False, 0):
            raise ApiError("logprobs: not supported by kvpipe serve", param="logprobs")
        room = self.max_context - prompt_len
        if room < 1:
            raise ApiError(f"This model's maximum context length is {self.max_context} tokens. However, your "
                           f"prompt has {prompt_len} tokens. Please reduce the length of the prompt.",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        if max_tokens is not None and prompt_len + max_tokens > self.max_context:
            raise ApiError(f"This model's maximum context length is {self.max_context} tokens. However, you "
                           f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                           "in the completion). Please reduce the length of the prompt or the completion.",
                           param="max_tokens", code="context_length_exceeded")
        return SamplingParams(max_new_tokens=max_tokens if max_tokens is not None else min(default_max, room),
                              temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, stop=_stop_list(req.stop),
                              seed=req.seed)

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ApiError(f"{param}: the prompt is empty", param=param)
        vocab = int(self.engine.lm.model.config.vocab_size)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(f"{param}: token id {bad} is outside the vocabulary (0..{vocab - 1})", param=param)
        return ids

    def completion_ids(self, req: CompletionRequest) -> list[int]:
        p: Any = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError("prompt: batches of prompts are not supported; send one prompt per request",
                               param="prompt")
            p = p[0]
        if isinstance(p, str):
            ids = list(self.tokenizer(p).input_ids) if p else []
        else:
            ids = [int(t) for t in p]
        return self.check_ids(ids, "prompt")

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        msgs = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                try:
                    content = "".join(part["text"] for part in content if part.get("type", "text") == "text")
                except (KeyError, TypeError):
                    raise ApiError(f"messages[{i}].content: only text parts are supported",
                                   param="messages") from None
            role = "system" if m.role == "developer" else m.role
            msgs.append({"role": role, "content": content or ""})
        try:
            ids = chat_prompt_ids(self.tokenizer, msgs)
        except ConfigError as exc:
            raise ApiError(str(exc), param="messages") from None
        except Exception as exc:  # a template that rejects the message order raises its own error types
            raise ApiError(f"messages: the chat template rejected them: {exc}", param="messages") from None
        return self.check_ids(ids, "messages")


def _usage(res: GenerationResult) -> dict[str, Any]:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.token_ids),
            "total_tokens": res.prompt_tokens + len(res.token_ids),
            "prompt_tokens_details": {"cached_tokens": min(res.hit_tokens, res.prompt_tokens)}}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _collect(recv: MemoryObjectReceiveStream[tuple[str, Any]]) -> GenerationResult:
    async with recv:
        async for kind, value in recv:
            if kind == "done":
                return value  # type: ignore[no-any-return]
            if kind == "error":
                raise ApiError(value, status=500, type_="server_error")
    raise ApiError("generation ended without a result", status=500, type_="server_error")


# ---------------------------------------------------------------------------------------------------- the app
def create_app(lm: CachedLM, *, model_id: str, cache: Cache | None = None,
               max_context: int | None = None) -> FastAPI:
    """The FastAPI app serving ``lm`` under the name ``model_id``. The engine thread starts and stops with the
    app's lifespan."""
    from contextlib import asynccontextmanager

    engine = Engine(lm)
    ctx = int(max_context or getattr(lm.model.config, "max_position_embeddings", 0) or 8192)
    served = _Served(engine, model_id, cache, ctx)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(engine.stop)

    app = FastAPI(title="kvpipe serve", lifespan=lifespan)
    app.state.served = served

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = f"{param}: {first.get('msg', 'invalid request')}" if param else str(first.get("msg", "invalid request"))
        endpoint = request.url.path.rsplit("/", 1)[-1]
        engine.metrics.count_request(endpoint, "bad_request")
        return JSONResponse(ApiError(msg, param=param).body(), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": served.created,
                                            "owned_by": "kvpipe", "max_model_len": ctx}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        served.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError("tokenize: give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            ids = served.chat_ids(req.messages)
        else:
            ids = list(served.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids)
        return {"tokens": ids, "count": len(ids), "max_model_len": ctx}

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = await anyio.to_thread.run_sync(cache.statistics) if cache is not None else None
        text = render_prometheus(engine.metrics, stats, queue_depth=engine.queue_depth, model=model_id)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/kvpipe/stats")
    async def kvpipe_stats() -> dict[str, Any]:
        if cache is None:
            return {"tiers": {}}
        stats = await anyio.to_thread.run_sync(cache.statistics)
        as_dict = getattr(stats, "as_dict", None)
        return as_dict() if callable(as_dict) else attrs.asdict(stats)  # type: ignore[no-any-return]

    async def _run(endpoint: str, ids: list[int], params: SamplingParams, stream: bool, include_usage: bool,
                   make_chunk: Callable[[str, str, str | None], dict[str, Any]],
                   make_full: Callable[[str, GenerationResult], dict[str, Any]],
                   first_chunk: Callable[[str], dict[str, Any]] | None) -> Any:
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        rid = f"{prefix}-{uuid.uuid4().hex}"
        recv, cancel = engine.submit(ids, params, rid)
        if not stream:
            try:
                res = await _collect(recv)
            except BaseException:
                cancel()
                engine.metrics.count_request(endpoint, "error")
                raise
            engine.metrics.count_request(endpoint, "ok")
            return make_full(rid, res)

        async def events() -> AsyncIterator[str]:
            status = "cancelled"  # until the result or an error arrives: the client went away
            try:
                async with recv:
                    if first_chunk is not None:
                        yield _sse(first_chunk(rid))
                    async for kind, value in recv:
                        if kind == "text":
                            yield _sse(make_chunk(rid, value, None))
                        elif kind == "done":
                            yield _sse(make_chunk(rid, "", value.finish_reason))
                            if include_usage:
                                yield _sse({**make_chunk(rid, "", None), "choices": [], "usage": _usage(value)})
                            status = "ok"
                            break
                        else:
                            status = "error"
                            yield _sse(ApiError(value, status=500, type_="server_error").body())
                            break
                yield "data: [DONE]\n\n"
            finally:
                if status != "ok":
                    cancel()
                engine.metrics.count_request(endpoint, status)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        try:
            served.check_model(req.model)
            if req.echo:
                raise ApiError("echo: not supported by kvpipe serve", param="echo")
            ids = served.completion_ids(req)
            params = served.params(req, len(ids), req.max_tokens, 16)
        except ApiError:
            engine.metrics.count_request("completions", "bad_request")
            raise
        now = int(time.time())

        def chunk(rid: str, text: str, finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": now, "model": model_id,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        def full(rid: str, res: GenerationResult) -> dict[str, Any]:
            return {**chunk(rid, res.text, res.finish_reason), "usage": _usage(res)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _run("completions", ids, params, req.stream, include_usage, chunk, full, None)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
        try:
            served.check_model(req.model)
            ids = served.chat_ids(req.messages)
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            params = served.params(req, len(ids), max_tokens, _DEFAULT_CHAT_MAX_TOKENS)
        except ApiError:
            engine.metrics.count_request("chat", "bad_request")
            raise
        now = int(time.time())

        def chunk(rid: str, text: str, finish: str | None) -> dict[str, Any]:
            delta = {"content": text} if text else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def first(rid: str) -> dict[str, Any]:
            c = chunk(rid, "", None)
            c["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return c

        def full(rid: str, res: GenerationResult) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                                 "logprobs": None, "finish_reason": res.finish_reason}],
                    "usage": _usage(res)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _run("chat", ids, params, req.stream, include_usage, chunk, full, first)

    return app
