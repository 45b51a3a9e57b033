"""Starting the ranks: under torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment) every rank
runs the same command; otherwise rank 0 spawns the others here (torch.multiprocessing), each building the same model
with the same arguments, with torchrun's environment set so both ways join alike."""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import subprocess
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist

from mtpx.errors import RequestError
from mtpx.parallel.config import ParallelConfig
from mtpx.parallel.group import Group

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # a pass's collectives; a lost rank is noticed sooner (group.py)
COMMAND_TIMEOUT = datetime.timedelta(days=365)  # ranks wait for rank 0's next command as long as rank 0 is up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(config: ParallelConfig, device: torch.device, spawn: Callable[[], None] | None = None) -> Group:
    """This process's rank of `config.world`. Without torchrun's environment, start the other ranks first:
    spawn() runs in each new process, with torchrun's environment set (the caller builds its model there)."""
    processes = {}
    if "RANK" not in os.environ and not dist.is_initialized():
        if spawn is None:
            raise RequestError("this process was not started by torchrun and cannot start the other ranks")
        port = free_port()
        for rank in range(1, config.world):
            env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(config.world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            # a fresh interpreter running this module (not multiprocessing's spawn, which re-imports the caller's
            # __main__), given the function to run by pickle on its stdin
            proc = subprocess.Popen([sys.executable, "-m", "mtpx.parallel.spawned"], stdin=subprocess.PIPE,
                                    env={**os.environ, **env})
            proc.stdin.write(pickle.dumps(spawn))
            proc.stdin.close()
            processes[rank] = proc
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(config.world),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != config.world:
        raise RequestError(f"torchrun started {world} processes; the requested split needs {config.world}")
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
    kinds: list[Any] = [None] * world
    dist.all_gather_object(kinds, device.type)
    if len(set(kinds)) > 1:
        raise RequestError(f"every rank must run on the same kind of device; the ranks have {kinds}")
    store = _command_store(rank, world, device)
    group = Group(rank, world, device, store, processes)
    if processes:
        group.watch()
    return group


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


