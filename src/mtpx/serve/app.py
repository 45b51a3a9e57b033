"""`mtpx serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the continuous-batching scheduler.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream: true → server-sent events in
OpenAI's chunk format, ending with `data: [DONE]`), GET /health, GET /metrics (Prometheus), GET / (chat page).
Bad input gets OpenAI-style error JSON `{"error": {"message", "type", "param", "code"}}` with a 4xx status.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtpx.engine.flags import add_spec_arguments, spec_from_args
from mtpx.engine.params import FieldError, SpecConfig, sampling_from_json
from mtpx.errors import RequestError
from mtpx.llm import LLM
from mtpx.serve.api import (ApiError, ApiKeyMiddleware, Body, chat_messages, completion_prompt, error_response,
                            read_body, usage)
from mtpx.serve.metrics import Metrics
from mtpx.serve.scheduler import Delta, GenRequest, Scheduler

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("mtpx.serve")
MAX_STOP = 16


class Server:
    """Holds the model, the scheduler and the metrics; builds the FastAPI app."""

    def __init__(self, llm: LLM, *, model_name: str | None = None, spec: SpecConfig | None = None,
                 api_key: str | None = None, max_num_seqs: int = 32, max_model_len: int | None = None,
                 default_max_tokens: int = 1024):
        self.llm = llm
        self.model_name = model_name or Path(str(llm.path)).name or "model"
        self.spec = spec or SpecConfig()
        self.api_key = api_key
        self.max_model_len = min(max_model_len or llm.max_context, llm.max_context)
        self.default_max_tokens = default_max_tokens
        self.metrics = Metrics(self.model_name)
        self.scheduler = Scheduler(llm, self.spec, self.metrics, max_num_seqs=max_num_seqs)
        self.created = int(time.time())
        self.started = time.time()

    # ---- parsing shared by both endpoints ----------------------------------------------------------------------
    def check_model(self, body: Body) -> None:
        model = body.get("model", "string")
        if model is not None and model not in (self.model_name, str(self.llm.path)):
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def sampling(self, body: Body, prompt_len: int, chat: bool) -> dict:
        for name in ("n", "best_of"):
            n = body.get(name, "integer", 1)
            if n != 1:
                raise ApiError(400, f"'{name}' = {n}: only {name}=1 is supported", name, "unsupported_parameter")
        body.unsupported("logprobs", lambda v: v is False or v == 0)
        body.unsupported("top_logprobs", lambda v: v == 0)
        body.unsupported("logit_bias", lambda v: isinstance(v, dict) and not v)
        body.unsupported("tools", lambda v: isinstance(v, list) and not v, " (no tool calling)")
        body.unsupported("functions", lambda v: isinstance(v, list) and not v, " (no function calling)")
        body.unsupported("tool_choice", lambda v: v == "none")
        body.unsupported("function_call", lambda v: v == "none")
        body.unsupported("response_format", lambda v: isinstance(v, dict) and v.get("type") == "text")
        body.unsupported("echo", lambda v: v is False)
        body.unsupported("suffix", lambda v: v == "")
        body.get("user", "string")
        body.get("stream_options", "object")
        try:  # unset values: the model's generation config, as vLLM applies it
            params = sampling_from_json(body.data, self.llm.sampling_defaults)
        except FieldError as e:
            raise ApiError.of(e) from None
        stop = body.get("stop", ("string", "array"))
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop or [])
        if len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, f"'stop' must be a string or an array of at most {MAX_STOP} strings", "stop",
                           "invalid_value")
        stop = [s for s in stop if s]
        name = "max_tokens"
        max_tokens = body.get("max_tokens", "integer")
        if chat and body.data.get("max_completion_tokens") is not None:
            name, max_tokens = "max_completion_tokens", body.get("max_completion_tokens", "integer")
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens if chat else 16, room)
        elif max_tokens <= 0:
            raise ApiError(400, f"'{name}' must be at least 1, got {max_tokens}", name, "invalid_value")
        elif max_tokens > room:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                           f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                           f"for the completion). Please reduce the prompt or {name}.", name,
                           "context_length_exceeded")
        return dict(params=params, stop=stop, max_tokens=max_tokens,
                    ignore_eos=bool(body.get("ignore_eos", "boolean", False)))

    def check_prompt_len(self, n: int, param: str) -> None:
        if n == 0:
            raise ApiError(400, "the prompt is empty", param, "invalid_value")
        if n >= self.max_model_len:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                           f"prompt has {n} tokens, leaving no room for a completion.", param,
                           "context_length_exceeded")

    def chat_prompt(self, body: Body) -> str:
        try:
            return self.llm.tokenizer.apply_chat_template(chat_messages(body), add_generation_prompt=True)
        except RequestError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None

    def completion_prompt(self, body: Body) -> list[int]:
        return completion_prompt(body, self.llm.tokenizer, self.llm.config.vocab_size)

    # ---- responses ---------------------------------------------------------------------------------------------
    def usage(self, stats: dict) -> dict:
        return usage(stats)

    async def generate(self, request: Request, chat: bool):
        body = await read_body(request)
        self.check_model(body)
        stream = body.get("stream", "boolean", False)
        if chat:
            prompt_ids = self.llm.tokenizer.encode(self.chat_prompt(body))
            param = "messages"
        else:
            prompt_ids = self.completion_prompt(body)
            param = "prompt"
        self.check_prompt_len(len(prompt_ids), param)
        kw = self.sampling(body, len(prompt_ids), chat)
        opts = body.get("stream_options", "object", {}) or {}
        include_usage = bool(opts.get("include_usage"))
        continuous = bool(opts.get("continuous_usage_stats"))
        if not self.scheduler.alive:
            raise ApiError(503, "the engine is not running", None, "engine_unavailable", "server_error")

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()

        def sink(delta: Delta) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        greq = GenRequest(prompt_ids, kw["max_tokens"], kw["params"], sink, stop=kw["stop"],
                          ignore_eos=kw["ignore_eos"])
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        self.scheduler.submit(greq)
        if stream:
            return StreamingResponse(self._sse(greq, queue, rid, created, chat, include_usage, continuous),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, greq, queue, rid, created, chat)

    async def _collect(self, request: Request, greq: GenRequest, queue: asyncio.Queue, rid: str, created: int,
                       chat: bool) -> JSONResponse:
        text, last = [], None
        checked = time.monotonic()
        try:
            while True:
                try:
                    delta = await asyncio.wait_for(queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    delta = None
                if time.monotonic() - checked > 0.25:  # deltas may keep coming: poll the socket on a clock
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        self.scheduler.cancel(greq)
                        return JSONResponse({}, status_code=499)
                if delta is None:
                    continue
                text.append(delta.text)
                if delta.finish_reason is not None:
                    last = delta
                    break
        finally:
            if last is None:
                self.scheduler.cancel(greq)
        if last.error:
            raise ApiError(500, last.error, None, "engine_error", "server_error")
        body = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": body}, "logprobs": None,
                   "finish_reason": last.finish_reason} if chat else
                  {"index": 0, "text": body, "logprobs": None, "finish_reason": last.finish_reason})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": self.model_name, "choices": [choice],
                             "usage": self.usage(last.stats), "system_fingerprint": None})

    async def _sse(self, greq: GenRequest, queue: asyncio.Queue, rid: str, created: int, chat: bool,
                   include_usage: bool, continuous: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, usage: dict | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            data = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [choice]}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        finished = False
        try:
            if chat:
                yield chunk(None, None, role=True)
            while True:
                delta = await queue.get()
                if delta.error:
                    err = {"message": delta.error, "type": "server_error", "param": None, "code": "engine_error"}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    finished = True
                    break
                final = delta.finish_reason is not None
                if delta.text or final:
                    usage = self.usage(delta.stats) if continuous or (final and not include_usage) else None
                    yield chunk(delta.text, delta.finish_reason, usage)
                if final:
                    finished = True
                    if include_usage:
                        data = {"id": rid, "object": obj, "created": created, "model": self.model_name,
                                "choices": [], "usage": self.usage(delta.stats)}
                        yield f"data: {json.dumps(data)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (or the response was cancelled): free the sequence
                self.scheduler.cancel(greq)

    # ---- the app -----------------------------------------------------------------------------------------------
    def health(self) -> dict:
        snap = self.metrics.snapshot()
        return {"status": "ok" if self.scheduler.alive else "engine_stopped", "model": self.model_name,
                "max_model_len": self.max_model_len, "spec_type": self.spec.kind,
                "spec_draft_n_max": self.spec.spec_draft_n_max, "spec_draft_policy": self.spec.spec_draft_policy,
                "uptime_s": time.time() - self.started, **snap}

    def build(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI):
            self.scheduler.start()
            try:
                yield
            finally:
                self.scheduler.stop()

        app = FastAPI(title="mtpx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.state.server = self

        @app.exception_handler(ApiError)
        async def _api_error(request: Request, exc: ApiError):
            return exc.response()

        @app.exception_handler(RequestError)
        async def _request_error(request: Request, exc: RequestError):
            if isinstance(exc, FieldError):
                return ApiError.of(exc).response()
            return error_response(400, str(exc), None, "invalid_value")

        @app.exception_handler(RequestValidationError)
        async def _validation_error(request: Request, exc: RequestValidationError):
            return error_response(400, str(exc), None, "invalid_value")

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request: Request, exc: StarletteHTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", None, code,
                                  headers=getattr(exc, "headers", None))

        @app.exception_handler(Exception)
        async def _internal(request: Request, exc: Exception):
            log.exception("internal error")
            return error_response(500, f"internal server error: {type(exc).__name__}", None, "internal_error",
                                  "server_error")

        if self.api_key:
            app.add_middleware(ApiKeyMiddleware, api_key=self.api_key)

        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(STATIC / "index.html", media_type="text/html")

        @app.get("/health")
        async def health():
            return self.health()

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

        def model_card() -> dict:
            return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mtpx",
                    "max_model_len": self.max_model_len}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [model_card()]}

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str):
            if model_id != self.model_name:
                raise ApiError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
            return model_card()

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self.generate(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self.generate(request, chat=True)

        return app


def create_app(llm: LLM, **kwargs) -> FastAPI:
    """The FastAPI app for `llm`; kwargs as for `Server` (model_name, spec, api_key, max_num_seqs, ...)."""
    return Server(llm, **kwargs).build()


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mtpx.commands.run import add_model_arguments
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* and /metrics")
    p.add_argument("--served-model-name", default=None, help="model id reported by /v1/models (default: the "
                   "checkpoint directory's name)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="most sequences decoded together (default 32)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--default-max-tokens", type=int, default=1024,
                   help="max_tokens for chat requests that give none (default 1024, capped by the context)")
    add_spec_arguments(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def main(args: argparse.Namespace) -> int:
    import uvicorn
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from mtpx.commands.run import load_model
    llm = load_model(args)
    name = args.served_model_name or ("demo" if args.model == "demo" else None)
    server = Server(llm, model_name=name, spec=spec_from_args(args), api_key=args.api_key,
                    max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                    default_max_tokens=args.default_max_tokens)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"mtpx serve: warning: listening on {args.host} without --api-key: anyone who can reach this port can "
              "use the model", file=sys.stderr)
    print(f"mtpx serve: model {server.model_name} ({llm.path}), speculation {server.spec.kind}, "
          f"chat page and API at http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(server.build(), host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
