"""The OpenAI-compatible API's request and response shapes: errors with the parameter they name, typed body
fields, the prompt of a chat or completion request, the usage block, and the API key check."""
from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from mtpx.engine.params import FieldError, json_field
from mtpx.engine.sequence import DraftCounts
from mtpx.engine.stats import draft_stats
from mtpx.tokenizer import Tokenizer


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type)

    @classmethod
    def of(cls, e: FieldError) -> "ApiError":
        """The 400 for a bad setting, naming it."""
        return cls(400, str(e), e.field, e.code)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    # a message may quote the request, lone surrogates included, which UTF-8 cannot encode
    message = message.encode("utf-8", "replace").decode("utf-8")
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


# ---- request validation --------------------------------------------------------------------------------------------
class Body:
    """Typed access to a JSON request body; every problem becomes a 400 naming the parameter."""

    def __init__(self, data: dict):
        self.data = data

    def get(self, name: str, kind: str | tuple[str, ...], default: Any = None) -> Any:
        try:
            return json_field(self.data, name, kind, default)
        except FieldError as e:
            raise ApiError.of(e) from None

    def unsupported(self, name: str, ok=lambda v: not v, why: str = "") -> None:
        value = self.data.get(name)
        if value is not None and not ok(value):
            raise ApiError(400, f"'{name}' = {json.dumps(value)[:80]} is not supported by this server{why}", name,
                           "unsupported_parameter")


async def read_raw(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 once it passes `limit` bytes: at once where Content-Length says so,
    else while it streams in (chunked), so a huge body is never held in memory."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "invalid Content-Length header", None, "invalid_request")
        if int(length) > limit:
            raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body larger than {limit} bytes (mtpx serve --max-request-bytes)", None,
                    "request_too_large")


def parse_body(raw: bytes) -> Body:
    """The JSON object of a request body; anything else is a 400 (also numbers past Python's int digit limit and
    nesting past its recursion limit)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        message = str(e) if not isinstance(e, RecursionError) else "nested too deeply"
        raise ApiError(400, f"request body is not valid JSON: {message[:200]}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", None, "invalid_json")
    return Body(data)


async def read_body(request: Request, limit: int = 4 << 20) -> Body:
    return parse_body(await read_raw(request, limit))


def chat_messages(body: Body) -> list[dict]:
    """The chat messages of a request, checked, as role / content pairs for the chat template."""
    messages = body.get("messages", "array")
    if messages is None:
        raise ApiError(400, "'messages' is required", "messages", "missing_required_parameter")
    if not messages:
        raise ApiError(400, "'messages' must not be empty", "messages", "invalid_value")
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object", where, "invalid_type")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"'{where}.role' must be one of system, developer, user, assistant; got "
                           f"{json.dumps(role)[:40]}", f"{where}.role", "invalid_value")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"'{where}.content[{j}]': only text content parts are supported",
                                   f"{where}.content", "unsupported_parameter")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(400, f"'{where}.content' must be a string or an array of text parts",
                           f"{where}.content", "invalid_type")
        if m.get("tool_calls"):
            raise ApiError(400, "tool calls are not supported", f"{where}.tool_calls", "unsupported_parameter")
        clean.append({"role": role, "content": content})
    return clean


def completion_prompt(body: Body, tokenizer: Tokenizer, vocab: int) -> list[int]:
    """The token ids of a completion request's prompt (text, or ids checked against the vocabulary)."""
    prompt = body.data.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"prompt token ids out of range [0, {vocab}): {bad[:5]}", "prompt",
                           "invalid_value")
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "batched prompts are not supported: send one prompt per request", "prompt",
                       "unsupported_parameter")
    raise ApiError(400, "'prompt' must be a string or an array of token ids", "prompt", "invalid_type")


SPEC_STATS_HEADER = "x-spec-stats"  # `X-Spec-Stats: true` asks for usage.spec_stats as "spec_stats": true does


def wants_spec_stats(body: Body, headers: Any = None) -> bool:
    """Whether a request asks for its speculation stats (the body's "spec_stats", or the X-Spec-Stats header)."""
    header = str((headers or {}).get(SPEC_STATS_HEADER, "") or "").strip().lower()
    return bool(body.get("spec_stats", "boolean", False)) or header in ("1", "true", "yes")


def spec_stats(stats: list[dict]) -> dict:
    """The speculation of a request, all its choices together: drafts, drafted and accepted tokens, acceptance in
    all and by draft position (rates and counts), per drafter (`by_drafter`: one name, or several for a chain)."""
    total, by = DraftCounts(), {}
    for s in stats:
        for name, d in (s.get("by_drafter") or {}).items():
            for c in (total, by.setdefault(name, DraftCounts())):
                c.drafts += d["drafts"]
                c.drafted_tokens += d["drafted_tokens"]
                c.accepted_tokens += d["accepted_tokens"]
                for attr in ("drafted_by_position", "accepted_by_position"):
                    mine, theirs = getattr(c, attr), d[attr]
                    mine.extend([0] * (len(theirs) - len(mine)))
                    for i, v in enumerate(theirs):
                        mine[i] += v
    spec_type = next((s["spec_type"] for s in stats if "spec_type" in s), "none")
    return {"spec_type": spec_type, **draft_stats(total), "by_drafter": {n: draft_stats(c) for n, c in by.items()}}


def usage(stats: dict) -> dict:
    """OpenAI's usage block, with the speculation stats under `speculative` (two keys in the API's spelling:
    completion_tokens, draft_tokens)."""
    p, c = stats.get("prompt_tokens", 0), stats.get("generated_tokens", 0)
    spec = {k: stats[k] for k in ("spec_type", "drafts", "accepted_tokens", "acceptance_rate",
                                  "mean_acceptance_length", "acceptance_by_position", "decode_tokens_per_s",
                                  "time_to_first_token_s") if k in stats}
    if "drafted_tokens" in stats:
        spec["draft_tokens"] = stats["drafted_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "speculative": spec}


class LocalGuardMiddleware:
    """Without an API key, what keeps web pages from driving the server through the user's browser: API posts must
    say `Content-Type: application/json` (a cross-origin page can send text/plain without a CORS preflight, not
    JSON), and the Host header must name an allowed host (against DNS rebinding). Plain ASGI, like ApiKeyMiddleware.
    allowed_hosts: host names (no port); "*" allows any."""

    def __init__(self, app, allowed_hosts: list[str]):
        self.app = app
        self.hosts = {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            host = headers.get(b"host", b"").decode("latin-1").lower()
            name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0] if \
                host.count(":") == 1 else host
            response = None
            if "*" not in self.hosts and name not in self.hosts:
                response = error_response(400, f"Host header {host[:100]!r} is not allowed (mtpx serve "
                                          "--allowed-hosts adds hosts)", None, "invalid_host")
            elif scope["method"] == "POST" and scope["path"].startswith("/v1"):
                media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
                if media != b"application/json":
                    response = error_response(415, "Content-Type must be application/json", None,
                                              "unsupported_media_type")
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ApiKeyMiddleware:
    """401 for /v1/* and /metrics without `Authorization: Bearer KEY`. Plain ASGI (not BaseHTTPMiddleware), so
    handlers still see client disconnects."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"].startswith("/v1") or scope["path"] == "/metrics"):
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = error_response(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                                          None, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
