"""The OpenAI-compatible HTTP API (FastAPI + uvicorn) over the continuous-batching scheduler; `mtpx serve`'s flags
are in command.py, request shapes in api.py, tools and structured outputs in structured.py, output parsing in
output.py, and how an answer's choices are streamed or collected in streaming.py.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream: true → server-sent events in
OpenAI's chunk format, ending with `data: [DONE]`), GET /health, GET /metrics (Prometheus), GET / (chat page).
Bad input gets OpenAI-style error JSON `{"error": {"message", "type", "param", "code"}}` with a 4xx status; a 500
only for a real fault, logged once. The body is read with a size limit (413) and parsed, checked and tokenized in a
worker thread, so one big request does not stall the event loop. Without an API key, LocalGuardMiddleware checks the
Host and Content-Type headers. On SIGTERM the server stops accepting, lets running requests finish for up to
shutdown_timeout seconds, then ends the rest: streams get a final chunk (finish_reason "abort"), an error event and
`[DONE]`, non-streaming requests a 503.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from mtpx.engine.params import FieldError, SpecConfig, sampling_from_json
from mtpx.errors import RequestError
from mtpx.llm import LLM
from mtpx.serve.api import (ApiError, ApiKeyMiddleware, Body, LocalGuardMiddleware, chat_messages, completion_prompt,
                            error_response, parse_body, read_raw, usage, wants_spec_stats)
from mtpx.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from mtpx.serve.metrics import Metrics
from mtpx.serve.output import Responder
from mtpx.serve.structured import ChatOptions, plain_messages, read_options, render_kwargs, template_messages
from mtpx.serve.scheduler import RANK_LOST, SHUTTING_DOWN, Scheduler
from mtpx.serve.streaming import Answer, open_choices

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("mtpx.serve")
MAX_N = 8  # most choices (n) a request may ask for
MAX_STOP = 16
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (each a flag of `mtpx serve`); the prompt's limit is the context."""
    max_request_bytes: int = 4 << 20  # request body
    max_stop: int = MAX_STOP  # stop strings per request
    max_stop_length: int = 256  # characters per stop string
    max_dry_breakers: int = 64  # DRY sequence breakers per request
    max_dry_breaker_length: int = 40  # characters per breaker (llama.cpp cuts them at 40)


class Server:
    """Holds the model, the scheduler and the metrics; builds the FastAPI app."""

    def __init__(self, llm: LLM, *, model_name: str | None = None, spec: SpecConfig | None = None,
                 api_key: str | None = None, max_num_seqs: int = 32, max_model_len: int | None = None,
                 default_max_tokens: int = 1024, limits: Limits | None = None, shutdown_timeout: float = 30.0,
                 allowed_hosts: list[str] | None = None, cors_origins: list[str] | None = None,
                 reasoning_format: str = "auto"):
        """allowed_hosts: Host header names accepted without an API key, besides localhost, 127.0.0.1 and ::1
        ("*": any). cors_origins: origins a browser may call the API from (none by default)."""
        self.llm = llm
        self.limits = limits or Limits()
        self.shutdown_timeout = shutdown_timeout
        self.allowed_hosts = [*LOCAL_HOSTS, *(allowed_hosts or [])]
        self.cors_origins = list(cors_origins or [])
        self.draining = False  # shutting down: new requests get a 503
        self.model_name = model_name or Path(str(llm.path)).name or "model"
        self.spec = spec or SpecConfig()
        self.api_key = api_key
        self.max_model_len = min(max_model_len or llm.max_context, llm.max_context)
        self.default_max_tokens = default_max_tokens
        self.reasoning_format = reasoning_format  # serve/output.py: think blocks into reasoning_content or not
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
        n = body.get("n", "integer", 1)
        if not 1 <= n <= MAX_N:
            raise ApiError(400, f"'n' = {n}: n must be in [1, {MAX_N}]", "n", "invalid_value")
        if body.get("best_of", "integer", 1) != 1:
            raise ApiError(400, "only best_of=1 is supported", "best_of", "unsupported_parameter")
        body.unsupported("logit_bias", lambda v: isinstance(v, dict) and not v)
        body.unsupported("functions", lambda v: isinstance(v, list) and not v, " (no function calling)")
        body.unsupported("function_call", lambda v: v == "none")
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
        lim = self.limits
        if len(stop) > lim.max_stop or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, f"'stop' must be a string or an array of at most {lim.max_stop} strings", "stop",
                           "invalid_value")
        if any(len(s) > lim.max_stop_length for s in stop):
            raise ApiError(400, f"each 'stop' string must be at most {lim.max_stop_length} characters", "stop",
                           "invalid_value")
        stop = [s for s in stop if s]
        breakers = params.dry_sequence_breakers
        if len(breakers) > lim.max_dry_breakers or any(len(b) > lim.max_dry_breaker_length for b in breakers):
            raise ApiError(400, f"'dry_sequence_breakers' must hold at most {lim.max_dry_breakers} strings of at "
                           f"most {lim.max_dry_breaker_length} characters", "dry_sequence_breakers", "invalid_value")
        if params.dry:  # find the breakers' token ids here, in the request's thread, not in the scheduler's
            self.llm.engine.breaker_ids(breakers)
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
        return dict(params=params, stop=stop, max_tokens=max_tokens, n=n,
                    ignore_eos=bool(body.get("ignore_eos", "boolean", False)))

    def check_prompt_len(self, n: int, param: str) -> None:
        if n == 0:
            raise ApiError(400, "the prompt is empty", param, "invalid_value")
        if n >= self.max_model_len:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                           f"prompt has {n} tokens, leaving no room for a completion.", param,
                           "context_length_exceeded")

    def chat_prompt_ids(self, body: Body, opts: ChatOptions | None = None) -> list[int]:
        """The chat template over the messages, tokenized; the messages' content is encoded as text, so a special
        token's text in it cannot forge a turn (Tokenizer.encode_chat). With opts: the tools, the messages' tool
        calls and results, and chat_template_kwargs go to the template (serve/structured.py)."""
        try:
            raw = body.data.get("messages")
            if opts is None or not isinstance(raw, list):
                return self.llm.tokenizer.encode_chat(chat_messages(body), add_generation_prompt=True)
            checked = chat_messages(Body({**body.data, "messages": plain_messages(raw)}))
            return self.llm.tokenizer.encode_chat(template_messages(raw, checked), add_generation_prompt=True,
                                                  **render_kwargs(opts))
        except RequestError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None

    def completion_prompt(self, body: Body) -> list[int]:
        return completion_prompt(body, self.llm.tokenizer, self.llm.config.vocab_size)

    # ---- responses ---------------------------------------------------------------------------------------------
    def usage(self, stats: dict) -> dict:
        return usage(stats)

    def shutting_down(self) -> ApiError:
        return ApiError(503, "the server is shutting down", None, SHUTTING_DOWN, "server_error")

    def prepare(self, raw: bytes, chat: bool) -> dict:
        """A request's bytes to what the scheduler needs: parsed, checked, rendered and tokenized. Runs in a worker
        thread (long texts are tokenized with the GIL released), so a big request does not stall the event loop."""
        body = parse_body(raw)
        self.check_model(body)
        stream = body.get("stream", "boolean", False)
        options = read_options(body.data, chat)  # tools, response_format, logprobs (a FieldError names the field)
        if chat:
            prompt_ids = self.chat_prompt_ids(body, options)
            param = "messages"
        else:
            prompt_ids = self.completion_prompt(body)
            param = "prompt"
        self.check_prompt_len(len(prompt_ids), param)
        kw = self.sampling(body, len(prompt_ids), chat)
        self.llm.engine.check_grammar(options.grammar)
        kw["params"] = options.apply(kw["params"])
        responder = Responder(self.llm.tokenizer, chat=chat, opts=options, reasoning_format=self.reasoning_format,
                              prompt_tail=self.llm.tokenizer.decode(prompt_ids[-24:]), eos=self.llm.eos)
        opts = body.get("stream_options", "object", {}) or {}
        return dict(body=body, stream=stream, prompt_ids=prompt_ids, kw=kw, responder=responder,
                    include_usage=bool(opts.get("include_usage")),
                    continuous=bool(opts.get("continuous_usage_stats")))

    async def handle(self, request: Request, chat: bool):
        """generate(), with any exception that is not a request error answered as one logged 500."""
        try:
            return await self.generate(request, chat)
        except (ApiError, RequestError, StarletteHTTPException):
            raise
        except ClientDisconnect:
            return JSONResponse({}, status_code=499)
        except Exception as e:
            log.exception("internal error in %s %s", request.method, request.url.path)
            return error_response(500, f"internal server error: {type(e).__name__}", None, "internal_error",
                                  "server_error")

    async def generate(self, request: Request, chat: bool):
        if self.draining:
            raise self.shutting_down()
        raw = await read_raw(request, self.limits.max_request_bytes)
        p = await asyncio.to_thread(self.prepare, raw, chat)
        prompt_ids, kw, stream = p["prompt_ids"], p["kw"], p["stream"]
        include_usage, continuous = p["include_usage"], p["continuous"]
        if self.draining or self.scheduler.stopping:
            raise self.shutting_down()
        if not self.scheduler.alive:
            raise ApiError(503, "the engine is not running", None, "engine_unavailable", "server_error")
        group = getattr(self.llm, "group", None)
        if group is not None and group.failed:  # the process exits in a moment (parallel/group.py)
            raise ApiError(503, f"the model is unavailable: {group.failed}", None, RANK_LOST, "server_error")

        choices = open_choices(prompt_ids, kw, p["responder"])
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            self.scheduler.submit(choices.greqs[0])  # the other choices ride with it: one prefill for all
        except RuntimeError:  # the scheduler began stopping since the check above
            raise self.shutting_down() from None
        answer = Answer(self, choices, rid, int(time.time()), chat, wants_spec_stats(p["body"], request.headers))
        if stream:
            return StreamingResponse(answer.events(include_usage, continuous), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await answer.collect(request)

    def begin_shutdown(self) -> None:
        """SIGTERM (or Ctrl-C): new requests get a 503; running ones may finish for shutdown_timeout seconds, then
        the scheduler ends the rest (each client gets its last chunk or a 503)."""
        if self.draining:
            return
        self.draining = True
        log.info("shutting down: running requests have %.0f s to finish", self.shutdown_timeout)
        asyncio.get_running_loop().call_later(max(0.0, self.shutdown_timeout), self.scheduler.request_stop)

    # ---- the app -----------------------------------------------------------------------------------------------
    def health(self) -> dict:
        snap = self.metrics.snapshot()
        status = "shutting_down" if self.draining else "ok" if self.scheduler.alive else "engine_stopped"
        return {"status": status, "model": self.model_name,
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
            # Starlette re-raises the exception after this response, and uvicorn logs it with its traceback: logging
            # here too would log it twice (the generation endpoints catch and log their own: Server.handle)
            return error_response(500, f"internal server error: {type(exc).__name__}", None, "internal_error",
                                  "server_error")

        if self.cors_origins:  # opt-in: a browser on these origins may call the API
            app.add_middleware(CORSMiddleware, allow_origins=self.cors_origins, allow_methods=["GET", "POST"],
                               allow_headers=["Authorization", "Content-Type"])
        if self.api_key:
            app.add_middleware(ApiKeyMiddleware, api_key=self.api_key)
        else:  # no key: keep web pages from driving the server through a browser (outermost: checked first)
            app.add_middleware(LocalGuardMiddleware, allowed_hosts=self.allowed_hosts)

        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(STATIC / "index.html", media_type="text/html")

        @app.get("/health")
        async def health():
            return self.health()

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(self.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

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
            return await self.handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self.handle(request, chat=True)

        return app


def create_app(llm: LLM, **kwargs) -> FastAPI:
    """The FastAPI app for `llm`; kwargs as for `Server` (model_name, spec, api_key, max_num_seqs, ...)."""
    return Server(llm, **kwargs).build()


def uvicorn_server(server: Server, host: str, port: int, log_level: str = "info"):
    """The uvicorn server that runs `server`'s app with mtpx's graceful shutdown (Server.begin_shutdown) and exit
    status 0 after SIGTERM (uvicorn would re-raise the signal once it has shut down)."""
    import uvicorn

    class MtpxUvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            server.begin_shutdown()
            await super().shutdown(sockets)

        def handle_exit(self, sig: int, frame) -> None:
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and sig in self._captured_signals:
                self._captured_signals.remove(sig)  # a SIGTERM shutdown is a clean exit

    # uvicorn's own deadline comes after ours: by then every request has had its last chunk
    config = uvicorn.Config(server.build(), host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=max(0.0, server.shutdown_timeout) + 10)
    return MtpxUvicorn(config)
