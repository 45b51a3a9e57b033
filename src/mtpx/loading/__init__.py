"""Checkpoint loading: Hugging Face directories (safetensors) and GGUF files, into one internal naming (HF names)."""
from mtpx.loading.checkpoint import Checkpoint, build_model, load_checkpoint

__all__ = ["Checkpoint", "build_model", "load_checkpoint"]
