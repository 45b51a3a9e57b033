"""model_type (config.json, or the GGUF architecture mapped to it by mtpx.config) -> the family's model class."""
from __future__ import annotations

from torch import nn

from mtpx.config import ModelConfig
from mtpx.errors import ModelLoadError
from mtpx.models.deepseek_v3 import DeepseekV3Model
from mtpx.models.glm4_moe import Glm4MoeModel
from mtpx.models.qwen3_5 import Qwen35Model

FAMILIES: dict[str, type[nn.Module]] = {
    "qwen3_5": Qwen35Model,
    "qwen3_5_text": Qwen35Model,
    "qwen3_5_moe": Qwen35Model,
    "qwen3_5_moe_text": Qwen35Model,
    "qwen3_next": Qwen35Model,  # with its projections rewritten at load (models/qwen3_next.py)
    "glm4_moe": Glm4MoeModel,
    "deepseek_v3": DeepseekV3Model,
    "glm4_moe_lite": DeepseekV3Model,  # GLM-4.7-Flash: DeepSeek-V3's MLA and MoE
}


def family(cfg: ModelConfig) -> type[nn.Module]:
    """The model class of cfg.model_type."""
    cls = FAMILIES.get(cfg.model_type)
    if cls is None:
        raise ModelLoadError(f"unsupported model_type {cfg.model_type!r}; mtpx supports {sorted(FAMILIES)}")
    return cls
