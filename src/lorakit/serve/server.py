"""An OpenAI-compatible HTTP server over the batched `Engine`: one base model, many adapters.

    serve("./llama", "./adapters", port=8000)        # or create_app(engine, pool, name); CLI: lorakit serve

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")
    client.completions.create(model="fr", prompt="Bonjour", max_tokens=20)   # adapter "fr"
    client.chat.completions.create(model="<base model name>", messages=[...])  # no adapter

Endpoints (FastAPI + uvicorn):
    POST /v1/completions, POST /v1/chat/completions   OpenAI request/response shapes; stream=true
                                                      answers Server-Sent Events ending "[DONE]"
    GET  /v1/models                                   the base model, then every adapter of the pool
    GET  /v1/adapters                                 available / resident / pinned adapters
    POST /v1/adapters/load   {"name", "pin": true}    load now (and pin: never evicted)
    POST /v1/adapters/unload {"name"}                 unpin and drop it from memory
    GET  /health, GET /metrics                        liveness; Prometheus text (no API key needed)

`model` picks the adapter: the base model's name serves the base model, any other name is an
adapter directory of the pool. Names are checked (`check_adapter_name`: no '/', '..', absolute
paths) before the file system is touched. Errors are OpenAI-shaped JSON,
{"error": {"message", "type", "code"}}: 400 bad parameters, an invalid name or an adapter that
fails to load (corrupt, wrong base model, ...), 401 wrong API key, 404 unknown model, 429 queue
full, 503 shutting down. An adapter failure fails only its own request.

Concurrency. One engine thread calls `engine.step()` while there is work (continuous batching
across all HTTP requests). Each request gets an `asyncio.Queue`; the engine's per-request
`on_token` callback feeds it through `loop.call_soon_threadsafe`. At most
`engine.max_batch + max_queue` requests are accepted at once (running + waiting); one more is
answered 429. Token ids become text incrementally (a window of already-decoded tokens gives the
tokenizer context, and text ending in an incomplete UTF-8 character is held back), stop strings
are matched on that text (with up to len(stop)-1 characters held back while streaming), and a
matched stop cancels the request in the engine. Streamed chunks concatenate to exactly the
non-streamed text.

Shutdown: uvicorn stops accepting connections and waits for the open responses; then the
lifespan hook refuses new work (503), waits up to `shutdown_timeout` s for queued requests,
cancels what is left and stops the engine thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter, deque
from contextlib import asynccontextmanager
from typing import Any

from pydantic import BaseModel, ConfigDict

from lorakit.core.adapter import check_adapter_name
from lorakit.core.io import CONFIG_NAME
from lorakit.errors import ConfigError, LorakitError
from lorakit.serve.engine import Engine, Request, TokenEvent

log = logging.getLogger("lorakit.serve")

_TOKENS_WINDOW_S = 10.0  # tokens/s is measured over this trailing window


# -- errors ---------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as OpenAI JSON: {"error": {"message", "type", "code", "param"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


class _Crash:
    """Put in a request's queue when the engine thread raised: the request ends with a 500."""

    def __init__(self, message: str):
        self.message = message


# -- text: token ids -> deltas, with stop strings --------------------------------------------


class TextStream:
    """Incremental detokenizer with stop strings.

    push(token) -> text that is safe to emit now; finish() -> the rest. After a stop string
    matched, `stopped` is True and `text` ends right before it (the stop is not included).
    """

    def __init__(self, tokenizer, stops: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in (stops or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # chars a partial stop may span
        self.ids: list[int] = []
        self._prefix = self._read = 0  # ids[_prefix:_read] were decoded already; they give context
        self.text = ""
        self._sent = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _new_text(self) -> str:
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        return after[len(before):] if len(after) > len(before) else ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        if not self.stopped:
            new = self._new_text()
            if new and not new.endswith("\ufffd"):  # else: an incomplete character, wait for more bytes
                self._prefix, self._read = self._read, len(self.ids)
                self._add(new)
        return self._take(final=self.stopped)

    def finish(self) -> str:
        if not self.stopped:
            new = self._new_text()
            self._prefix = self._read = len(self.ids)
            self._add(new)
        return self._take(final=True)

    def _add(self, new: str) -> None:
        self.text += new
        hits = [i for i in (self.text.find(s, self._sent) for s in self.stops) if i >= 0]
        if hits:  # the earliest match; it cannot start before _sent (see `hold`)
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else max(self._sent, len(self.text) - self.hold)
        out, self._sent = self.text[self._sent:end], end
        return out


# -- chat template ----------------------------------------------------------------------------


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """(prompt text, whether the text already holds the special tokens) for chat `messages`.

    Uses the tokenizer's chat template with the generation prompt; without one, a plain
    "Role: content" transcript ending in "Assistant:".
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, True
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines + ["Assistant:"]), False


# -- the engine thread and its asyncio bridge ---------------------------------------------------


class _Bridge:
    """Runs the engine in one thread; routes TokenEvents to each request's asyncio.Queue."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.capacity = engine.max_batch + max_queue
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._started: set[str] = set()  # requests that produced their first event
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.draining = False
        self.generated_tokens = 0
        self.engine_errors = 0
        self._window: deque[tuple[float, int]] = deque()  # (time, tokens) per step

    # -- thread ----------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
                self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        engine = self.engine
        while True:
            if not engine.has_work():
                if self._stop.is_set():
                    return
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                events = engine.step()
            except Exception as e:  # the server must outlive a failing step
                log.exception("engine step failed")
                self._fail_all(f"engine error: {type(e).__name__}: {e}")
                continue
            n = sum(ev.token is not None for ev in events)
            if n:
                now = time.monotonic()
                with self._lock:
                    self.generated_tokens += n
                    self._window.append((now, n))
            if not events:
                engine.wait_for_adapters(0.05)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            self.engine_errors += 1
            pending, self._pending = self._pending, {}
            self._started.clear()
        for rid, (loop, q) in pending.items():
            self.engine.cancel(rid)
            _put(loop, q, _Crash(message))

    def _on_token(self, ev: TokenEvent) -> None:  # engine thread
        with self._lock:
            entry = self._pending.pop(ev.request_id, None) if ev.finished else self._pending.get(ev.request_id)
            if ev.finished:
                self._started.discard(ev.request_id)
            elif entry is not None:
                self._started.add(ev.request_id)
        if entry is not None:
            _put(*entry, ev)

    # -- requests (event loop side) ---------------------------------------------------------
    def reserve(self) -> tuple[str, asyncio.Queue]:
        """A request id and queue, counted against the capacity (429 when full)."""
        if self.draining:
            raise APIError(503, "the server is shutting down", "server_error", "shutting_down")
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if len(self._pending) >= self.capacity:
                raise APIError(429, f"the request queue is full ({self.capacity} requests in flight); retry later",
                               "rate_limit_error", "queue_full", headers={"Retry-After": "1"})
            rid = uuid.uuid4().hex
            self._pending[rid] = (asyncio.get_running_loop(), q)
        return rid, q

    def release(self, rid: str) -> None:
        with self._lock:
            self._pending.pop(rid, None)

    def submit(self, rid: str, request: Request) -> None:
        request.request_id = rid
        try:
            self.engine.add(request, on_token=self._on_token)
        except BaseException:
            self.release(rid)
            raise
        self.start()
        self._wake.set()

    def cancel(self, rid: str) -> None:
        self.engine.cancel(rid)
        self._wake.set()

    # -- stats / shutdown ---------------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        """(in flight, of which still queued)."""
        with self._lock:
            return len(self._pending), len(self._pending) - len(self._started)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0][0] < now - _TOKENS_WINDOW_S:
                self._window.popleft()
            return sum(n for _, n in self._window) / _TOKENS_WINDOW_S

    def shutdown(self, timeout: float) -> None:
        """Refuse new requests, let in-flight ones finish (cancel them after `timeout` s), stop the thread."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.counts()[0] and time.monotonic() < deadline and self.alive:
            time.sleep(0.02)
        with self._lock:
            left = list(self._pending)
        for rid in left:
            log.warning("shutdown: cancelling request %s", rid)
            self.cancel(rid)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, timeout))


def _put(loop: asyncio.AbstractEventLoop, q: asyncio.Queue, item) -> None:
    try:
        loop.call_soon_threadsafe(q.put_nowait, item)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass


# -- request bodies ---------------------------------------------------------------------------


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted (and checked below)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]


class ChatBody(_Sampling):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None


class AdapterBody(BaseModel):
    name: str
    pin: bool = True


# Parameters that would change the output in ways this server does not implement: refused
# rather than silently ignored. (value -> is it a request for the unsupported feature?)
_UNSUPPORTED = {
    "logprobs": lambda v: bool(v), "top_logprobs": lambda v: v is not None, "echo": lambda v: bool(v),
    "best_of": lambda v: v not in (None, 1), "suffix": lambda v: bool(v), "logit_bias": lambda v: bool(v),
    "presence_penalty": lambda v: v not in (None, 0), "frequency_penalty": lambda v: v not in (None, 0),
    "tools": lambda v: bool(v), "functions": lambda v: bool(v),
    "response_format": lambda v: v not in (None, {"type": "text"}),
}


# -- the app ----------------------------------------------------------------------------------


def create_app(engine: Engine, pool, base_model_name: str, api_key: str | None = None, max_queue: int = 256, *,
               tokenizer=None, shutdown_timeout: float = 30.0):
    """The FastAPI app serving `engine` (base model `base_model_name`) and the adapters of `pool`.

    engine: a `lorakit.serve.Engine`; its thread is started with the app (lifespan) or on the
        first request.
    pool: the engine's `AdapterPool` (None: `engine.pool`; an engine without one serves the base model only).
    api_key: when set, every /v1 endpoint needs "Authorization: Bearer <api_key>" (401 otherwise).
    max_queue: requests that may wait beyond the `engine.max_batch` running ones; more get 429.
    tokenizer: text <-> ids (default: `engine.tokenizer`; without one only token-id prompts work).
    shutdown_timeout: seconds in-flight requests get to finish on shutdown before being cancelled.
    """
    from fastapi import APIRouter, Depends, FastAPI, Header
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise ConfigError(f"max_queue must be an integer >= 0, got {max_queue!r}")
    if not isinstance(base_model_name, str) or not base_model_name:
        raise ConfigError(f"base_model_name must be a non-empty string, got {base_model_name!r}")
    pool = engine.pool if pool is None else pool
    if engine.pool is not pool:
        raise ConfigError("pool must be the engine's AdapterPool (the one passed to Engine)")
    tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
    bridge = _Bridge(engine, max_queue)
    http_counts: Counter = Counter()

    @asynccontextmanager
    async def lifespan(app):
        bridge.start()
        yield
        await asyncio.to_thread(bridge.shutdown, shutdown_timeout)

    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.bridge = bridge
    app.state.engine = engine
    app.state.pool = pool
    app.state.base_model_name = base_model_name
    routes = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/adapters", "/v1/adapters/load",
              "/v1/adapters/unload", "/health", "/metrics"}
    app.add_middleware(_StatusCounter, counts=http_counts, routes=routes)

    # -- errors ------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in errs[:5])
        param = ".".join(str(x) for x in errs[0].get("loc", ())[1:]) if errs else None
        return JSONResponse(APIError(400, f"invalid request: {msg}", param=param or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type_).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").body(),
                            status_code=500)

    # -- auth --------------------------------------------------------------------------------
    async def check_key(authorization: str | None = Header(default=None)) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    # -- helpers -----------------------------------------------------------------------------
    def adapter_of(model: str) -> str | None:
        """None for the base model, else a checked adapter name that exists in the pool."""
        if model == base_model_name:
            return None
        try:
            check_adapter_name(model)
        except ConfigError as e:
            raise APIError(400, f"model {model!r} is neither the base model {base_model_name!r} nor a valid "
                                f"adapter name: {e}", code="invalid_adapter_name", param="model") from None
        try:
            known = pool is not None and (pool.path_of(model) / CONFIG_NAME).is_file()
        except LorakitError as e:  # e.g. a symlink leaving the adapter directory
            raise APIError(400, str(e), code="invalid_adapter_name", param="model") from None
        if not known:
            names = [base_model_name] + (pool.available() if pool is not None else [])
            shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            raise APIError(404, f"the model {model!r} does not exist; available: {shown}",
                           code="model_not_found", param="model")
        return model

    async def ensure_loaded(name: str, pin: bool = False):
        """Load (and optionally pin) adapter `name` in a worker thread; load errors -> 400."""
        if not pin and name in pool:
            return None
        try:
            return await asyncio.to_thread(pool.pin if pin else pool.get, name)
        except LorakitError as e:
            raise APIError(400, f"adapter {name!r} cannot be served: {e}", code="adapter_load_failed",
                           param="model") from None
        except Exception as e:  # a broken file is the adapter's problem, not a crash
            log.exception("loading adapter %r failed", name)
            raise APIError(400, f"adapter {name!r} failed to load: {type(e).__name__}: {e}",
                           code="adapter_load_failed", param="model") from None

    def check_supported(body) -> None:
        extra = body.model_extra or {}
        for key, wants in _UNSUPPORTED.items():
            if key in extra and wants(extra[key]):
                raise APIError(400, f"parameter {key!r} is not supported by this server", code="unsupported_parameter",
                               param=key)
        if body.n not in (None, 1):
            raise APIError(400, f"only n=1 is supported, got n={body.n}", code="unsupported_parameter", param="n")

    def encode(text: str, special: bool = True) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer: send the prompt as token ids", param="prompt")
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])

    def make_request(body, prompt_ids: list[int], adapter: str | None, max_tokens: int | None,
                     default_max: int | None, chat: bool) -> Request:
        limit = engine.max_positions
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        if limit and len(prompt_ids) >= limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but the prompt has "
                                f"{len(prompt_ids)}", code="context_length_exceeded",
                           param="messages" if chat else "prompt")
        if max_tokens is None:
            room = limit - len(prompt_ids) if limit else None
            max_tokens = min(x for x in (default_max, room, 1 << 30) if x is not None)
        elif limit and len(prompt_ids) + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but {len(prompt_ids)} "
                                f"prompt + {max_tokens} completion tokens were requested",
                           code="context_length_exceeded", param="max_tokens")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else (body.top_p if body.top_p > 0 else 1e-9)  # top_p=0: greedy-like
        seed = None if body.seed is None else body.seed % (1 << 63)
        try:
            return Request(prompt_ids, adapter=adapter, max_new_tokens=max_tokens, temperature=temperature,
                           top_p=top_p, seed=seed)
        except ConfigError as e:
            raise APIError(400, str(e)) from None

    def stops_of(body) -> list[str]:
        stop = body.stop
        if stop is None:
            return []
        return [stop] if isinstance(stop, str) else list(stop)

    async def start(request: Request) -> tuple[str, asyncio.Queue]:
        rid, q = bridge.reserve()
        try:
            if request.adapter is not None:
                await ensure_loaded(request.adapter)
            bridge.submit(rid, request)
        except LorakitError as e:
            bridge.release(rid)
            raise APIError(400, str(e)) from None
        except BaseException:
            bridge.release(rid)
            raise
        return rid, q

    async def pieces(rid: str, q: asyncio.Queue, text: TextStream):
        """Yield (text delta, finish reason or None) until the request ends."""
        done = False
        try:
            while True:
                ev = await q.get()
                if isinstance(ev, _Crash):
                    done = True
                    raise APIError(500, ev.message, "server_error", "engine_error")
                if ev.error is not None:
                    done = True
                    raise APIError(400, ev.error, code="adapter_load_failed", param="model")
                if ev.token is not None:
                    delta = text.push(ev.token)
                    if text.stopped and not ev.finished:  # a stop string matched: end it now
                        bridge.cancel(rid)
                        done = True
                        yield delta, "stop"
                        return
                    if not ev.finished:
                        if delta:
                            yield delta, None
                        continue
                if ev.finished:
                    done = True
                    reason = {"stop": "stop", "length": "length", "cancelled": "abort"}.get(ev.finish_reason,
                                                                                          ev.finish_reason)
                    delta = (delta if ev.token is not None else "") + text.finish()
                    yield delta, "stop" if text.stopped else reason
                    return
        finally:
            if not done:  # the client went away or the handler failed: stop generating
                bridge.cancel(rid)

    def usage(prompt_ids: list[int], text: TextStream) -> dict:
        p, c = len(prompt_ids), len(text.ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def respond(body, prompt_ids: list[int], adapter: str | None, max_tokens: int | None,
                      default_max: int | None, chat: bool):
        check_supported(body)
        request = make_request(body, prompt_ids, adapter, max_tokens, default_max, chat)
        text = TextStream(tokenizer, stops_of(body)) if tokenizer is not None else None
        if text is None:
            raise APIError(400, "this server has no tokenizer, so it cannot return text")
        rid, q = await start(request)
        cid = ("chatcmpl-" if chat else "cmpl-") + rid
        created = int(time.time())
        gen = pieces(rid, q, text)

        def choice(delta: str, reason: str | None, stream: bool) -> dict:
            if not chat:
                return {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}
            key = "delta" if stream else "message"
            msg = ({"content": delta} if delta else {}) if stream else {"role": "assistant", "content": delta}
            return {"index": 0, key: msg, "logprobs": None, "finish_reason": reason}

        obj = "chat.completion" if chat else "text_completion"
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        if not body.stream:
            out, reason = [], None
            try:
                async for delta, reason in gen:
                    out.append(delta)
            finally:
                await gen.aclose()
            return JSONResponse({"id": cid, "object": obj, "created": created, "model": body.model,
                                 "choices": [choice("".join(out), reason, False)], "usage": usage(prompt_ids, text)})

        try:  # wait for the first piece, so that an adapter or engine error is still a clean 4xx/5xx
            first = await gen.__anext__()
        except BaseException:
            await gen.aclose()
            raise
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def chunk(delta: str, reason: str | None, role: bool = False) -> str:
            c = choice(delta, reason, True)
            if role:
                c["delta"] = {"role": "assistant", "content": ""}
            return sse({"id": cid, "object": chunk_obj, "created": created, "model": body.model, "choices": [c]})

        async def events():
            try:
                if chat:
                    yield chunk("", None, role=True)
                delta, reason = first
                while True:
                    if delta or reason is not None:
                        yield chunk(delta, reason)
                    if reason is not None:
                        break
                    delta, reason = await gen.__anext__()
                if include_usage:
                    yield sse({"id": cid, "object": chunk_obj, "created": created, "model": body.model,
                               "choices": [], "usage": usage(prompt_ids, text)})
            except APIError as e:  # after the 200 header: report it in-band, as OpenAI does
                yield sse(e.body())
            finally:
                await gen.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- endpoints ------------------------------------------------------------------------------
    @v1.post("/completions")
    async def completions(body: CompletionBody):
        adapter = adapter_of(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request is supported, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        ids = encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return await respond(body, ids, adapter, body.max_tokens, 16, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatBody):
        adapter = adapter_of(body.model)
        if not body.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        messages = [_message(m, i) for i, m in enumerate(body.messages)]
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer, so it cannot render chat messages")
        try:
            prompt, has_special = render_chat(tokenizer, messages)
        except Exception as e:  # noqa: BLE001 -- a template that rejects these messages
            raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
        ids = encode(prompt, special=not has_special)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await respond(body, ids, adapter, max_tokens, None, chat=True)

    @v1.get("/models")
    async def models():
        names = pool.available() if pool is not None else []
        data = [{"id": base_model_name, "object": "model", "created": 0, "owned_by": "lorakit", "parent": None}]
        data += [{"id": n, "object": "model", "created": 0, "owned_by": "lorakit", "parent": base_model_name}
                 for n in names if n != base_model_name]
        return {"object": "list", "data": data}

    @v1.get("/adapters")
    async def adapters():
        if pool is None:
            return {"available": [], "resident": [], "pinned": []}
        stats = pool.stats
        return {"available": pool.available(), "resident": list(stats.adapters), "pinned": list(stats.pinned)}

    @v1.post("/adapters/load")
    async def load_adapter(body: AdapterBody):
        name = adapter_of(body.name) if body.name != base_model_name else None
        if name is None:
            raise APIError(400, f"{body.name!r} is the base model, not an adapter", param="name")
        loaded = await ensure_loaded(name, pin=body.pin)
        if loaded is None:
            loaded = pool.peek(name)
        return {"name": name, "loaded": True, "pinned": body.pin,
                "method": getattr(loaded, "method", None), "rank": getattr(loaded, "rank", None),
                "bytes": getattr(loaded, "nbytes", None)}

    @v1.post("/adapters/unload")
    async def unload_adapter(body: AdapterBody):
        name = adapter_of(body.name) if body.name != base_model_name else None
        if name is None:
            raise APIError(400, f"{body.name!r} is the base model, not an adapter", param="name")
        return {"name": name, "unloaded": pool.evict(name)}

    app.include_router(v1)

    @app.get("/health")
    async def health():
        ok = not bridge.draining and (bridge.alive or bridge._thread is None)
        status = "ok" if ok else ("draining" if bridge.draining else "engine thread stopped")
        in_flight, queued = bridge.counts()
        return JSONResponse({"status": status, "model": base_model_name, "in_flight": in_flight, "queued": queued},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(bridge, engine, pool, http_counts),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _message(m: dict, i: int) -> dict:
    role, content = m.get("role"), m.get("content")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise APIError(400, f"messages[{i}].role must be system, developer, user, assistant or tool, got {role!r}",
                       param=f"messages.{i}.role")
    if content is None:
        content = ""
    elif isinstance(content, list):  # content parts: only text is understood
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages.{i}.content")
            parts.append(part["text"])
        content = "".join(parts)
    elif not isinstance(content, str):
        raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                       param=f"messages.{i}.content")
    return {"role": role, "content": content}


class _StatusCounter:
    """Pure ASGI middleware counting responses per (route, status code); streaming-safe."""

    def __init__(self, app, counts: Counter, routes: set[str]):
        self.app, self.counts, self.routes = app, counts, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in self.routes else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.counts[(route, message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counted)


def _prometheus(bridge: _Bridge, engine: Engine, pool, http_counts: Counter) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"{name}{lab} {value}")

    in_flight, queued = bridge.counts()
    stats = engine.stats
    metric("lorakit_queue_length", "gauge", "Accepted requests not yet generating (queued or loading an adapter).",
           [({}, queued)])
    metric("lorakit_requests_in_flight", "gauge", "Accepted requests not yet finished.", [({}, in_flight)])
    metric("lorakit_requests_running", "gauge", "Rows in the engine's running batch.", [({}, stats["running"])])
    metric("lorakit_queue_capacity", "gauge", "Requests accepted at once (max_batch + max_queue); more get 429.",
           [({}, bridge.capacity)])
    metric("lorakit_tokens_per_second", "gauge", f"Generated tokens per second over the last {_TOKENS_WINDOW_S:g} s.",
           [({}, round(bridge.tokens_per_second(), 3))])
    metric("lorakit_generated_tokens_total", "counter", "Tokens generated.", [({}, bridge.generated_tokens)])
    metric("lorakit_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [({}, stats["prefill_tokens"])])
    metric("lorakit_engine_steps_total", "counter", "Engine steps.", [({}, stats["steps"])])
    metric("lorakit_engine_errors_total", "counter", "Engine steps that raised.", [({}, bridge.engine_errors)])
    metric("lorakit_requests_finished_total", "counter", "Requests the engine finished.",
           [({}, stats["requests_finished"])])
    metric("lorakit_adapter_slot_hits_total", "counter", "Admissions whose adapter was already in a device slot.",
           [({}, stats["slot_hits"])])
    metric("lorakit_adapter_slot_loads_total", "counter", "Adapters copied into a device slot.",
           [({}, stats["slot_loads"])])
    if pool is not None:
        ps = pool.stats
        metric("lorakit_adapter_cache_hits_total", "counter", "Adapter pool lookups found resident.", [({}, ps.hits)])
        metric("lorakit_adapter_cache_misses_total", "counter", "Adapter pool loads from disk.", [({}, ps.misses)])
        metric("lorakit_adapter_cache_evictions_total", "counter", "Adapters evicted from the pool.",
               [({}, ps.evictions)])
        metric("lorakit_adapter_load_failures_total", "counter", "Adapter loads that failed.", [({}, ps.failed_loads)])
        metric("lorakit_adapter_cache_bytes", "gauge", "Bytes of adapter factors resident.", [({}, ps.bytes)])
        metric("lorakit_adapter_cache_budget_bytes", "gauge", "Adapter pool budget.", [({}, ps.budget_bytes)])
        metric("lorakit_adapters_resident", "gauge", "Adapters resident in the pool.", [({}, len(ps.adapters))])
        metric("lorakit_adapters_pinned", "gauge", "Pinned adapters.", [({}, len(ps.pinned))])
    metric("lorakit_http_responses_total", "counter", "HTTP responses by route and status code.",
           [({"route": r, "code": c}, n) for (r, c), n in sorted(http_counts.items())])
    return "\n".join(lines) + "\n"


# -- running it -------------------------------------------------------------------------------


def build_app(model_name_or_path: str, adapter_dir=None, *, api_key: str | None = None, max_queue: int = 256,
              max_batch: int = 8, budget_mb: float = 1024, dtype="float32", device: str | None = None,
              target="all-linear", served_model_name: str | None = None, shutdown_timeout: float = 30.0,
              rank_groups: str | int = "pow2", schedule: str = "affinity"):
    """Load the base model (`lorakit.models.load_model`), build pool + engine, return the app.
    rank_groups: the engine's rank grouping ("pow2", "exact" or a fixed int rank; see `Engine`).
    schedule: the engine's admission order ("affinity" or "fcfs"; see `Engine`)."""
    import torch

    from lorakit.models import load_model
    from lorakit.serve.cache import AdapterPool

    if not isinstance(budget_mb, (int, float)) or isinstance(budget_mb, bool) or budget_mb <= 0:
        raise ConfigError(f"budget_mb must be a positive number, got {budget_mb!r}")
    model, tokenizer = load_model(model_name_or_path, dtype=dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    pool = AdapterPool(adapter_dir, budget_bytes=int(budget_mb * (1 << 20))) if adapter_dir is not None else None
    engine = Engine(model, tokenizer, pool, max_batch=max_batch, target=target, rank_groups=rank_groups,
                    schedule=schedule)
    return create_app(engine, pool, served_model_name or str(model_name_or_path), api_key=api_key,
                      max_queue=max_queue, shutdown_timeout=shutdown_timeout)


def serve(model_name_or_path: str, adapter_dir=None, host: str = "127.0.0.1", port: int = 8000, *,
          log_level: str = "info", **kw) -> None:
    """Serve `model_name_or_path` and the adapters of `adapter_dir` until interrupted (Ctrl-C / SIGTERM).

    kw: api_key, max_queue, max_batch, budget_mb, dtype, device, target, served_model_name,
    shutdown_timeout, rank_groups, schedule (see `build_app` / `create_app`).
    """
    import uvicorn

    if kw.get("api_key") is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    app = build_app(model_name_or_path, adapter_dir, **kw)
    uvicorn.run(app, host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=kw.get("shutdown_timeout", 30.0))


def main_serve(model: str, adapters=None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_batch: int = 8, budget_mb: float = 1024, rank_groups: str | int = "pow2",
               schedule: str = "affinity") -> int:
    """Entry point of `lorakit serve`; the API key falls back to $LORAKIT_API_KEY. Returns 0."""
    if api_key is None:
        api_key = os.environ.get("LORAKIT_API_KEY") or None
    serve(model, adapters, host, port, api_key=api_key, max_batch=max_batch, budget_mb=budget_mb,
          rank_groups=rank_groups, schedule=schedule)
    return 0


__all__ = ["APIError", "TextStream", "build_app", "create_app", "main_serve", "render_chat", "serve"]
