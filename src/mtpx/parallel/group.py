"""The ranks of one model: the collectives its shards call, rank 0's command channel, and the watch on the ranks.

Exactness: a row's result must not depend on how many rows a pass holds (models/qwen3_5.py), so a sum over ranks
must add the same partials in the same order for every row and every pass size. Two ranks' all-reduce is a + b,
the same bits in either order; with more ranks a ring all-reduce adds in an order that depends on where the row
falls in the buffer, so there the partials are gathered and added in rank order instead.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mtpx.errors import RankLost

GRACE_S = 3.0  # after a rank is lost: how long rank 0 keeps answering (503) before its process exits


@dataclass
class CollectiveStats:
    """Time in collectives and bytes moved so far: `mtpx bench --tensor-parallel` takes differences per decode round."""
    seconds: float = 0.0
    calls: int = 0
    bytes: int = 0

    def add(self, seconds: float, nbytes: int) -> None:
        self.seconds += seconds
        self.calls += 1
        self.bytes += nbytes


@dataclass
class Group:
    """This process's rank among `world`, the device its shard is on, and the store carrying rank 0's commands."""
    rank: int
    world: int
    device: torch.device
    store: dist.Store
    processes: dict = field(default_factory=dict)  # rank -> worker process, where this process started them
    stats: CollectiveStats = field(default_factory=CollectiveStats)
    timing: bool = False  # on CUDA, wait for each collective so stats.seconds is its time (the bench sets it)
    failed: str | None = None
    _sent: int = 0
    _received: int = 0
    _closing: bool = False
    _on_failure: list = field(default_factory=list)

    @property
    def last(self) -> int:
        return self.world - 1

    # ---- collectives of the sharded model ---------------------------------------------------------------------------
    def _timed(self, op, nbytes: int):
        if self.failed:
            raise RankLost(self.failed)
        started = time.perf_counter()
        try:
            out = op()
            if self.timing and self.device.type == "cuda":  # NCCL returns at once; waiting costs overlap
                torch.cuda.synchronize(self.device)
        except (RuntimeError, dist.DistError) as e:
            self.fail(f"a collective failed ({e})")
            raise RankLost(self.failed) from e
        self.stats.add(time.perf_counter() - started, nbytes)
        return out

    def reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of x (each rank's partial result), in place; the same bits for every row."""
        if self.world == 2:
            self._timed(lambda: dist.all_reduce(x), x.numel() * x.element_size())
            return x
        parts = self._gather(x)
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return x.copy_(out)

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x joined along the last dimension, in rank order."""
        return torch.cat(self._gather(x), dim=-1)

    def _gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._timed(lambda: dist.all_gather(parts, x.contiguous()), x.numel() * x.element_size() * self.world)
        return parts

    def send(self, x: torch.Tensor, dst: int) -> None:
        self._timed(lambda: dist.send(x.contiguous(), dst), x.numel() * x.element_size())

    def recv_like(self, x: torch.Tensor, src: int) -> torch.Tensor:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        self._timed(lambda: dist.recv(out, src), x.numel() * x.element_size())
        return out

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        out = x.contiguous()
        self._timed(lambda: dist.broadcast(out, src), x.numel() * x.element_size())
        return out

    def gather_object(self, value: object) -> list:
        """Every rank's value, in rank order (a collective: every rank calls it at the same point)."""
        out: list = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    # ---- rank 0's commands ------------------------------------------------------------------------------------------
    def tell(self, message: object) -> None:
        """Send a command to every other rank (rank 0 only), in order."""
        if self.failed:
            raise RankLost(self.failed)
        self.store.set(f"cmd{self._sent}", pickle.dumps(message))
        self._sent += 1

    def listen(self) -> object:
        """The next command from rank 0 (other ranks), waiting as long as rank 0 is up; the last reader of a
        command deletes it, so the store holds only those not yet read."""
        key = f"cmd{self._received}"
        message = pickle.loads(self.store.get(key))
        if self.store.add(f"read{self._received}", 1) == self.world - 1:
            self.store.delete_key(key)
            self.store.delete_key(f"read{self._received}")
        self._received += 1
        return message

    # ---- failure ----------------------------------------------------------------------------------------------------
    def on_failure(self, callback) -> None:
        """Call callback(message) when a rank is lost (the server starts answering 503)."""
        self._on_failure.append(callback)

    def fail(self, message: str) -> None:
        """A rank is gone: say which, tell the callbacks, and end this process after GRACE_S, so nothing waits on
        the lost rank forever (a collective on NCCL may never return)."""
        if self.failed or self._closing:
            return
        self.failed = message
        print(f"mtpx: rank {self.rank}: {message}; exiting in {GRACE_S:.0f} s", file=sys.stderr, flush=True)
        for callback in self._on_failure:
            callback(message)
        timer = threading.Timer(GRACE_S, os._exit, (1,))
        timer.daemon = True
        timer.start()

    def watch(self) -> None:
        """Watch the worker processes this one started (rank 0): a rank that exits fails the group."""
        def loop():
            while not self._closing and not self.failed:
                for rank, proc in self.processes.items():
                    if proc.poll() is not None and not self._closing:
                        self.fail(f"rank {rank} exited with code {proc.returncode}")
                time.sleep(0.2)
        threading.Thread(target=loop, name="mtpx-rank-watch", daemon=True).start()

    def close(self) -> None:
        """Rank 0: tell the others to stop, wait for the processes it started, leave the process group."""
        if self._closing:
            return
        self._closing = True
        if self.rank == 0 and not self.failed:
            try:
                self.tell(("stop",))
            except Exception:  # the store is gone: the others are too
                pass
        for proc in self.processes.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
