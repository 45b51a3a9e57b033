"""Starting the ranks: under torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment) every rank
runs the same command; otherwise rank 0 spawns the others here, each building the same model with the same
arguments, and hosts the store they join through (which then carries its commands)."""
from __future__ import annotations

import datetime
import os
import pickle
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist

from mtpx.errors import RequestError
from mtpx.parallel.config import ParallelConfig
from mtpx.parallel.group import Group

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # a pass's collectives; a lost rank is noticed sooner (group.py)
COMMAND_TIMEOUT = datetime.timedelta(days=365)  # ranks wait for rank 0's next command as long as rank 0 is up


def join(config: ParallelConfig, device: torch.device, spawn: Callable[[], None] | None = None) -> Group:
    """This process's rank of `config.world`. Without torchrun's environment, start the other ranks first:
    spawn() runs in each new process (the caller builds its model there), which joins through a store this
    process hosts (MTPX_STORE); a rank that exits before joining is an error here, not a wait."""
    processes, store = {}, None
    if os.environ.get("MTPX_STORE"):  # a rank spawned below
        host, port = os.environ["MTPX_STORE"].rsplit(":", 1)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(host, int(port), world, is_master=False, timeout=COMMAND_TIMEOUT)
        store.set(f"joined{rank}", "1")
    elif "RANK" in os.environ:  # torchrun's
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    elif dist.is_initialized():
        raise RequestError("this process already runs a model over several ranks: close() it before loading another")
    else:
        if spawn is None:
            raise RequestError("this process was not started by torchrun and cannot start the other ranks")
        rank, world = 0, config.world
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=COMMAND_TIMEOUT,
                              wait_for_workers=False)
        for r in range(1, world):
            env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                   "MTPX_STORE": f"127.0.0.1:{store.port}"}
            # a fresh interpreter running parallel/spawned.py (not multiprocessing's spawn, which re-imports the
            # caller's __main__), given the function to run by pickle on its stdin
            proc = subprocess.Popen([sys.executable, "-m", "mtpx.parallel.spawned"], stdin=subprocess.PIPE, env=env)
            proc.stdin.write(pickle.dumps(spawn))
            proc.stdin.close()
            processes[r] = proc
        _wait_for_ranks(store, processes)
    if world != config.world:
        raise RequestError(f"torchrun started {world} processes; the requested split needs {config.world}")
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if store is not None:
            dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                                    timeout=COLLECTIVE_TIMEOUT)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    group = Group(rank, world, device, store if store is not None else _command_store(rank, world, device), processes)
    kinds = group.gather_object(device.type)
    if len(set(kinds)) > 1:
        raise RequestError(f"every rank must run on the same kind of device; the ranks have {kinds}")
    if processes:
        group.watch()
    return group


def _wait_for_ranks(store: dist.Store, processes: dict) -> None:
    waiting = dict(processes)
    while waiting:
        for r, proc in list(waiting.items()):
            if store.check([f"joined{r}"]):
                del waiting[r]
            elif proc.poll() is not None:
                for other in processes.values():
                    other.kill()
                raise RequestError(f"rank {r} exited with code {proc.returncode} before joining (see its output "
                                   "above)")
        time.sleep(0.05)


def _command_store(rank: int, world: int, device: torch.device) -> dist.Store:
    """A store hosted by rank 0 for its commands: the others' reads fail as soon as rank 0 is gone."""
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    store = dist.TCPStore(host, 0, world, is_master=True, timeout=COMMAND_TIMEOUT,
                          wait_for_workers=False) if rank == 0 else None
    address = [store.port if store is not None else None]
    dist.broadcast_object_list(address, src=0, device=device if device.type == "cuda" else None)
    if store is None:
        store = dist.TCPStore(host, address[0], world, is_master=False, timeout=COMMAND_TIMEOUT)
    return store


