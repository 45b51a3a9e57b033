"""RunnerConfig: how passes may run, read once (from the environment, then from the caller's choices) when a model
is loaded; nothing below the runners reads an environment switch."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass


def _flag(name: str, default: str = "1") -> bool:
    return os.environ.get(name, default) != "0"


@dataclass(frozen=True)
class RunnerConfig:
    """Switches of the fast paths, each on by default, for comparisons and for machines where one misbehaves.
    - pack (MTPX_PACK): fuse projections that read the same input into one matmul (on CPU bf16, prepack too);
    - tiles (MTPX_AMX): bf16 weights packed as AMX tiles where the CPU has AMX;
    - static_steps: step passes of one sequence at fixed addresses and shapes (runners/static.py); None: on CUDA for
      dense models (MoE routing picks experts on the host);
    - cuda_graphs (MTPX_CUDA_GRAPHS): replay static passes as CUDA graphs;
    - compile_step_ops (MTPX_COMPILE_STEP_OPS): compile the small op groups of static passes on CUDA;
    - triton_gdn (MTPX_TRITON_GDN): the Gated DeltaNet recurrence of static passes as one Triton kernel: "1" on CUDA,
      "0" never, "interpret" also off CUDA, in Triton's interpreter (tests);
    - threads (MTPX_THREADS): a fixed CPU thread count for decoding; 0 lets the thread tuner choose."""
    pack: bool = True
    tiles: bool = True
    static_steps: bool | None = None
    cuda_graphs: bool = True
    compile_step_ops: bool = True
    triton_gdn: str = "1"
    threads: int = 0

    @classmethod
    def from_env(cls, **given) -> "RunnerConfig":
        """The environment's switches, overridden by the given fields that are not None."""
        env = cls(pack=_flag("MTPX_PACK"), tiles=_flag("MTPX_AMX"), cuda_graphs=_flag("MTPX_CUDA_GRAPHS"),
                  compile_step_ops=_flag("MTPX_COMPILE_STEP_OPS"), triton_gdn=os.environ.get("MTPX_TRITON_GDN", "1"),
                  threads=int(os.environ.get("MTPX_THREADS", "0") or 0))
        return dataclasses.replace(env, **{k: v for k, v in given.items() if v is not None})
