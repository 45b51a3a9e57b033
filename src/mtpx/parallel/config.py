"""ParallelConfig: how many ranks run one model, and how it is cut between them."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mtpx.config import ModelConfig
from mtpx.errors import RequestError
from mtpx.models.qwen3_5 import Qwen35Model
from mtpx.models.registry import family


@dataclass(frozen=True)
class ParallelConfig:
    """tensor: ranks splitting every layer's heads, MLP and experts, and the output head's vocabulary (vLLM's
    --tensor-parallel-size); stages: proportions of contiguous layer ranges, one rank each (llama.cpp's
    --split-mode layer with --tensor-split), the MTP layer on the last. At most one of the two is used."""
    tensor: int = 1
    stages: tuple[float, ...] = ()

    @classmethod
    def parse(cls, tensor_parallel: int | None = None, split_layers: int | str | list | None = None) -> "ParallelConfig":
        """From --tensor-parallel N and --split-layers (a stage count N, or proportions "3,1")."""
        tensor = 1 if tensor_parallel is None else tensor_parallel
        if not isinstance(tensor, int) or tensor < 1:
            raise RequestError(f"--tensor-parallel must be a positive integer, got {tensor_parallel!r}")
        stages = _stages(split_layers)
        if tensor > 1 and len(stages) > 1:
            raise RequestError("use --tensor-parallel or --split-layers, not both")
        return cls(tensor, stages if len(stages) > 1 else ())

    @property
    def world(self) -> int:
        return max(self.tensor, len(self.stages), 1)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def kind(self) -> str:
        return "tensor" if self.tensor > 1 else "layers" if self.stages else "none"

    def check(self, cfg: ModelConfig, device: torch.device) -> None:
        """Refuse, before anything is loaded, a split the model or the machine cannot take."""
        if not self.enabled:
            return
        if family(cfg) is not Qwen35Model:
            raise RequestError(f"--tensor-parallel / --split-layers run the Qwen3.5 family (Qwen3.5, Qwen3.6, "
                               f"Qwen3-Next); this checkpoint is {cfg.model_type}")
        if self.tensor > 1:
            counts = {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
                      "linear_num_key_heads": cfg.linear_num_key_heads,
                      "linear_num_value_heads": cfg.linear_num_value_heads}
            counts.update({"moe_intermediate_size": cfg.moe_intermediate_size,
                           "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size} if cfg.is_moe
                          else {"intermediate_size": cfg.intermediate_size})
            bad = [f"{k}={v}" for k, v in counts.items() if v % self.tensor]
            if bad:
                raise RequestError(f"--tensor-parallel {self.tensor} must divide the model's {', '.join(bad)}")
        elif len(self.stages) > cfg.num_hidden_layers:
            raise RequestError(f"--split-layers asks for {len(self.stages)} stages; the model has "
                               f"{cfg.num_hidden_layers} layers")
        if device.type == "cuda":
            if self.world > torch.cuda.device_count():
                raise RequestError(f"{self.world} ranks need {self.world} GPUs; this machine has "
                                   f"{torch.cuda.device_count()}")
        elif self.world > (cores := len(os.sched_getaffinity(0))):
            raise RequestError(f"{self.world} CPU ranks need at least {self.world} cores; this process may use {cores}")

    def layer_ranges(self, n_layers: int) -> list[tuple[int, int]]:
        """Each stage's [first, end) layers: in proportion to its share, at least one each."""
        total, bounds, acc = sum(self.stages), [0], 0.0
        for i, share in enumerate(self.stages[:-1]):
            acc += share
            low, high = bounds[-1] + 1, n_layers - (len(self.stages) - 1 - i)
            bounds.append(min(max(round(n_layers * acc / total), low), high))
        bounds.append(n_layers)
        return list(zip(bounds[:-1], bounds[1:]))


def _stages(given: int | str | list | None) -> tuple[float, ...]:
    if given in (None, "", 0, 1, "1"):
        return ()
    try:
        if isinstance(given, int) or (isinstance(given, str) and given.strip().isdigit()):
            n = int(given)
            if n < 1:
                raise ValueError
            return (1.0,) * n
        parts = given.split(",") if isinstance(given, str) else list(given)
        shares = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise RequestError(f"--split-layers takes a stage count (2) or proportions (3,1), got {given!r}") from None
    if not shares or any(s <= 0 for s in shares):
        raise RequestError(f"--split-layers proportions must be positive, got {given!r}")
    return shares
