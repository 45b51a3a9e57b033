"""Every rank runs the same engine calls: rank 0's MirroredEngine tells each call that changes a sequence (open, the
prefills, decode rounds, release) to the other ranks before making it, and their `follow` loop makes the same call
on their own engine. The calls are deterministic given their arguments, so each rank's sequences, drafters and
sampling stay identical, and the sharded model's collectives line up pass by pass. What is not deterministic is
decided on rank 0 and sent along: the draft length the adaptive policy picks (it measures time), and the seed of a
sampled request that gave none.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import weakref
from typing import Any

import torch

from mtpx.engine.engine import Engine
from mtpx.engine.request import Request
from mtpx.engine.sequence import Sequence
from mtpx.errors import MtpxError, RankLost, RequestError
from mtpx.parallel.group import Group
from mtpx.speculative.loop import choose_k, room


@dataclasses.dataclass(frozen=True)
class Ref:
    """An object rank 0 told the others about (a request, its sequence, a drafter), by its number."""
    id: int
    seq: bool = False  # the request's sequence rather than the request


class ChosenK:
    """A draft policy whose next choice was already made (on rank 0): a draft length, or a draft tree's shape (a
    tuple of branches per depth); what the round measured goes to the policy that chose it, where there is one."""

    def __init__(self, k: int | tuple[int, ...], n_max: int, policy: Any = None):
        self.k, self.n_max, self.policy = k, n_max, policy  # n_max: the most a chain's lookup drafter may draft

    def next_k(self, batch: int = 1, catch_up: int = 0, remaining: int | None = None) -> int | tuple[int, ...]:
        return self.k

    def skip_gap(self) -> None:
        if self.policy is not None:
            self.policy.skip_gap()

    def observe_catch_up(self, done: tuple[int, float] | None) -> None:
        if self.policy is not None:
            self.policy.observe_catch_up(done)

    def observe(self, *args: Any, **kw: Any) -> None:
        if self.policy is not None:
            self.policy.observe(*args, **kw)

    def restart_timing(self) -> None:
        if self.policy is not None:
            self.policy.restart_timing()


class MirroredEngine(Engine):
    """Rank 0's engine; `group` carries its calls to the other ranks."""
    group: Group

    def attach(self, group: Group) -> "MirroredEngine":
        self.group = group
        self._ids: dict[int, int] = {}  # id(object) -> its number
        self._next = 0
        self._depth = 0  # calls inside a told call are the other ranks' to make themselves
        self._forgotten: list[int] = []
        return self

    # ---- telling ----------------------------------------------------------------------------------------------------
    def _number(self, obj: Any) -> int:
        n = self._next
        self._next += 1
        self._ids[id(obj)] = n
        return n

    def _ref(self, x: Any) -> Any:
        if isinstance(x, Request):
            return Ref(self._ids[id(x)])
        if isinstance(x, Sequence):
            return Ref(self._ids[id(x)], seq=True)
        if isinstance(x, (list, tuple)):
            return type(x)(self._ref(v) for v in x)
        if isinstance(x, ChosenK):
            return ChosenK(x.k, x.n_max)
        if id(x) in self._ids:
            return Ref(self._ids[id(x)])
        return x

    def _call(self, name: str, *args: Any, register: bool = False, **kw: Any) -> Any:
        if self._depth:
            return getattr(super(), name)(*args, **kw)
        if self.group.failed:
            raise RankLost(self.group.failed)
        number = self._next if register else None
        forgotten, self._forgotten = self._forgotten, []
        self.group.tell(("call", name, self._ref(args), self._ref(kw), number, forgotten))
        self._depth += 1
        try:
            out = getattr(super(), name)(*args, **kw)
        finally:
            self._depth -= 1
        if register and out is not None:
            self._number(out)
            if isinstance(out, Request):
                self._ids[id(out.seq)] = self._ids[id(out)]
            else:  # a drafter: the others drop theirs when rank 0's is gone
                weakref.finalize(out, self._forget, id(out))
        return out

    def _forget(self, key: int) -> None:
        number = self._ids.pop(key, None)
        if number is not None:
            self._forgotten.append(number)

    # ---- the calls the others repeat ----------------------------------------------------------------------------------
    def drafter(self, spec, batched: bool = False):
        if spec.spec_draft_vocab:  # a draft head reads rows of the output head, which no rank holds whole
            raise RequestError("spec_draft_vocab (a reduced draft head) is not available with --tensor-parallel / "
                               "--split-layers; leave it 0")
        return self._call("drafter", spec, batched, register=True)

    def open(self, ids, max_tokens, params, **kw):
        if params.seed is None and not params.greedy:  # every rank must sample alike
            params = dataclasses.replace(params, seed=int(torch.randint(0, 2 ** 62, ()).item()))
        return self._call("open", ids, max_tokens, params, register=True, **kw)

    def start(self, req, drafter):
        return self._call("start", req, drafter)

    def start_shared(self, reqs, drafter):
        return self._call("start_shared", reqs, drafter)

    def decode_round(self, drafter, policy, seqs):
        if drafter is None or policy is None or self._depth:
            return self._call("decode_round", drafter, policy if drafter is not None else None, seqs)
        chosen = ChosenK(choose_k(policy, drafter, seqs, room(seqs)), policy.n_max, policy)
        return self._call("decode_round", drafter, chosen, seqs)

    def release(self, seq):
        number = self._ids.get(id(seq))
        if self.group.failed:  # the others are gone: only this rank's caches are left to free
            super().release(seq)
        else:
            self._call("release", seq)
        for key in [k for k, v in self._ids.items() if v == number]:
            del self._ids[key]

    def logits(self, token_ids):
        return self._call("logits", token_ids)


def _resolve(x: Any, objects: dict[int, Any]) -> Any:
    if isinstance(x, Ref):
        obj = objects[x.id]
        return obj.seq if x.seq else obj
    if isinstance(x, (list, tuple)):
        return type(x)(_resolve(v, objects) for v in x)
    return x


def follow(engine: Engine, group: Group) -> None:
    """Another rank's loop: make rank 0's calls on this rank's engine until rank 0 says stop (or is gone), then
    end the process."""
    objects: dict[int, Any] = {}
    code = 0
    try:
        while True:
            message = group.listen()
            if message[0] == "stop":
                break
            _, name, args, kw, number, forgotten = message
            for n in forgotten:
                objects.pop(n, None)
            try:
                with torch.inference_mode():
                    out = getattr(engine, name)(*_resolve(args, objects), **_resolve(kw, objects))
            except (MtpxError, ValueError):  # a bad request: rank 0's own call fails the same way and reports it
                out = None
            if number is not None:
                objects[number] = out
            if name == "release":
                gone = args[0]
                objects.pop(gone.id, None)
    except (RankLost, RuntimeError, ConnectionError, EOFError) as e:
        print(f"mtpx: rank {group.rank}: rank 0 is gone or a collective failed ({e}); exiting", file=sys.stderr,
              flush=True)
        code = 1
    if code == 0:
        group.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # not sys.exit: nothing of the caller's (its own code after LLM(), atexit hooks) is to run here
