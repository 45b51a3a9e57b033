"""How one request's answer comes back: its n choices (GenRequests sharing one prefill, scheduler.py) report their
deltas on one queue, streamed as server-sent events in OpenAI's chunk format (each chunk one choice's delta, with
`choices[i].index`, each choice ending with its own finish_reason, then `data: [DONE]`) or collected into one
response whose `choices` hold them all. Usage counts the prompt once and every choice's completion tokens.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from mtpx.serve.api import ApiError, spec_stats, usage
from mtpx.serve.output import Responder
from mtpx.serve.scheduler import RANK_LOST, SHUTTING_DOWN, Delta, GenRequest

if TYPE_CHECKING:
    from mtpx.serve.app import Server

POLL_S = 0.25  # how often a collecting request checks whether its client went away


@dataclass
class Choices:
    """The n choices of one request: greqs[0] carries the others as siblings and is the one submitted."""
    greqs: list[GenRequest]
    responders: list[Responder]
    queue: asyncio.Queue  # (choice index, Delta)


def open_choices(prompt_ids: list[int], kw: dict, responder: Responder) -> Choices:
    """kw["n"] GenRequests for one prompt; choice i samples with the given seed + i (independent samples that a
    request with that seed reproduces), and each gets a parser of its own."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    greqs, responders = [], []
    seed = kw["params"].seed
    for i in range(kw["n"]):
        params = kw["params"] if i == 0 or seed is None else \
            dataclasses.replace(kw["params"], seed=(seed + i) % 2 ** 63)

        def sink(delta: Delta, i: int = i) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (i, delta))
        greqs.append(GenRequest(prompt_ids, kw["max_tokens"], params, sink, stop=kw["stop"],
                                ignore_eos=kw["ignore_eos"]))
        responders.append(responder if i == 0 else responder.fresh())
    greqs[0].siblings = greqs[1:]
    return Choices(greqs, responders, queue)


def total_usage(stats: list[dict | None], with_spec_stats: bool = False) -> dict:
    """The usage block of all choices: the prompt once, the completion tokens of every choice; the speculation
    stats are the first choice's (with_spec_stats: all choices' in `spec_stats`, api.spec_stats)."""
    out = usage(stats[0] or {})
    out["completion_tokens"] = sum((s or {}).get("generated_tokens", 0) for s in stats)
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    if with_spec_stats:
        out["spec_stats"] = spec_stats([s for s in stats if s])
    return out


class Answer:
    """One request's response, streamed (events) or whole (collect)."""

    def __init__(self, server: Server, choices: Choices, rid: str, created: int, chat: bool,
                 with_spec_stats: bool = False):
        self.server, self.choices, self.rid, self.created, self.chat = server, choices, rid, created, chat
        self.with_spec_stats = with_spec_stats  # usage.spec_stats asked for

    def cancel(self) -> None:
        """Free every choice's sequence (a no-op for those already finished)."""
        for g in self.choices.greqs:
            self.server.scheduler.cancel(g)

    # ---- whole --------------------------------------------------------------------------------------------------
    async def collect(self, request: Request) -> JSONResponse:
        n = len(self.choices.greqs)
        texts: list[list[str]] = [[] for _ in range(n)]
        token_ids: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list] = [[] for _ in range(n)]
        last: list[Delta | None] = [None] * n
        checked = time.monotonic()
        try:
            while any(d is None for d in last):
                try:
                    i, delta = await asyncio.wait_for(self.choices.queue.get(), timeout=POLL_S)
                except asyncio.TimeoutError:
                    i, delta = 0, None
                if time.monotonic() - checked > POLL_S:  # deltas may keep coming: poll the socket on a clock
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                if delta is None or last[i] is not None:
                    continue
                texts[i].append(delta.text)
                token_ids[i] += delta.token_ids
                logprobs[i] += delta.logprobs or []
                if delta.finish_reason is not None:
                    last[i] = delta
                    if delta.error:
                        break
        finally:
            if any(d is None or d.error for d in last):
                self.cancel()
        failed = next((d for d in last if d is not None and d.error), None)
        if failed is not None:
            if failed.error_code == SHUTTING_DOWN:
                raise self.server.shutting_down()
            if failed.error_code == RANK_LOST:
                raise ApiError(503, failed.error, None, RANK_LOST, "server_error")
            raise ApiError(500, failed.error, None, "engine_error", "server_error")
        choices = []
        for i, (responder, delta) in enumerate(zip(self.choices.responders, last)):
            body = "".join(texts[i])
            lp = responder.logprobs(token_ids[i], logprobs[i])
            choices.append({"index": i, "message": responder.message(body), "logprobs": lp,
                            "finish_reason": responder.finish_reason(delta.finish_reason)} if self.chat else
                           {"index": i, "text": body, "logprobs": lp, "finish_reason": delta.finish_reason})
        return JSONResponse({"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                             "created": self.created, "model": self.server.model_name, "choices": choices,
                             "usage": total_usage([d.stats for d in last], self.with_spec_stats),
                             "system_fingerprint": None})

    # ---- streamed -----------------------------------------------------------------------------------------------
    def _chunk(self, i: int, text: str | None, finish: str | None, usage_: dict | None = None, role: bool = False,
               parsed: dict | None = None, logprobs: dict | None = None) -> str:
        if self.chat:
            delta = ({"role": "assistant", "content": ""} if role else parsed if parsed is not None else
                     ({"content": text} if text else {}))
            choice = {"index": i, "delta": delta, "logprobs": logprobs,
                      "finish_reason": self.choices.responders[i].finish_reason(finish) if finish else None}
        else:
            choice = {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        data = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.server.model_name, "choices": [choice]}
        if usage_ is not None:
            data["usage"] = usage_
        return f"data: {json.dumps(data)}\n\n"

    async def events(self, include_usage: bool, continuous: bool) -> AsyncIterator[str]:
        """The server-sent events of the answer. Without include_usage, the usage rides on the last choice's last
        chunk (continuous: on every chunk, all choices so far)."""
        n = len(self.choices.greqs)
        stats: list[dict | None] = [None] * n
        done: set[int] = set()
        ended = False
        try:
            if self.chat:
                for i in range(n):
                    yield self._chunk(i, None, None, role=True)
            while len(done) < n:
                i, delta = await self.choices.queue.get()
                if i in done:
                    continue
                if delta.error:
                    if delta.error_code == SHUTTING_DOWN:  # a last chunk per open choice saying why it ends here
                        for j in range(n):
                            if j not in done:
                                yield self._chunk(j, None, "abort")
                    err = {"message": delta.error, "type": "server_error", "param": None,
                           "code": delta.error_code or "engine_error"}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    break
                stats[i] = delta.stats
                if delta.finish_reason is not None:
                    done.add(i)
                for chunk in self._delta_chunks(i, delta, stats, len(done) == n, include_usage, continuous):
                    yield chunk
            else:
                if include_usage:
                    data = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                            "created": self.created, "model": self.server.model_name, "choices": [],
                            "usage": total_usage(stats, self.with_spec_stats)}
                    yield f"data: {json.dumps(data)}\n\n"
            ended = True
            yield "data: [DONE]\n\n"
        finally:
            if not ended or len(done) < n:  # the client went away, or a choice failed: free every sequence
                self.cancel()

    def _delta_chunks(self, i: int, delta: Delta, stats: list, last: bool, include_usage: bool,
                      continuous: bool) -> list[str]:
        """The chunks of choice i's delta: chat text through its parser (content, reasoning_content and tool-call
        deltas), completions text as it is. last: this delta ends the last open choice."""
        responder = self.choices.responders[i]
        final = delta.finish_reason is not None
        lp = responder.logprobs(delta.token_ids, delta.logprobs)

        def usage_if(end: bool) -> dict | None:
            return total_usage(stats, self.with_spec_stats) if continuous or (end and last and not include_usage) \
                else None
        if not self.chat:
            if delta.text or final or lp is not None:
                return [self._chunk(i, delta.text, delta.finish_reason, usage_if(final), logprobs=lp)]
            return []
        parts = responder.feed(delta.text) + (responder.finish() if final else [])
        if lp is not None and not parts and not final:
            parts = [{}]
        out = []
        for j, part in enumerate(parts):
            end = final and j == len(parts) - 1
            out.append(self._chunk(i, None, delta.finish_reason if end else None, usage_if(end), parsed=part,
                                   logprobs=lp if j == 0 else None))
        if final and not parts:
            out.append(self._chunk(i, None, delta.finish_reason, usage_if(True), logprobs=lp))
        return out
