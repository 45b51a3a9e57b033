"""mtpx: local LLM inference built around lossless multi-token-prediction speculative decoding."""
from mtpx.llm import LLM, Completion, StreamEvent

__all__ = ["LLM", "Completion", "StreamEvent"]
__version__ = "0.1.0"
