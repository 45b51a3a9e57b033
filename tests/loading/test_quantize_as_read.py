"""int4 / int8 weights quantized as the checkpoint is read (runners/weights.py Quantizer.as_read, offered each tensor
by loading/checkpoint.py build_model) against quantizing the loaded model (quantize): the same formats, bits and
counts, the same logits and greedy tokens, and a load that holds the bf16 of about one layer at a time, not the
model's."""
import weakref

import numpy as np
import pytest
import torch

import mtpx
from mtpx.loading import build_model, load_checkpoint
from mtpx.models.linear import QuantizedWeight, fused_projection
from mtpx.models.qwen3_5 import Experts
from mtpx.runners import Runner, RunnerConfig
from mtpx.runners.cpu import CpuRunner
from mtpx.runners.weights import Quantizer, fuse_projections, quantize

from tests.loading.test_gguf_blocks import mixed_gguf, needs_kernel  # noqa: F401 - fixtures

CHECKPOINTS = {  # name -> (fixture, its arguments)
    "dense": ("ckpt_factory", {}), "tied": ("ckpt_factory", dict(tied=True)), "moe": ("ckpt_factory", dict(moe=True)),
    "moe-per-expert": ("ckpt_factory", dict(moe=True, per_expert=True)),
    "qwen3-next": ("family_factory", dict(family="qwen3_next")), "glm": ("family_factory", dict(family="glm")),
    "deepseek": ("family_factory", dict(family="deepseek")),
}


def _path(request, name: str):
    if name == "gguf":
        return request.getfixturevalue("mixed_gguf")
    fixture, kwargs = CHECKPOINTS[name]
    return request.getfixturevalue(fixture)(**kwargs)


def _load(path, kind: str, fuse: bool, as_read: bool) -> tuple[torch.nn.Module, dict]:
    """A model loaded and quantized as the CPU runner's prepare_weights does (projections fused where `fuse`), each
    weight quantized as read or all of them once loaded; with the counts quantize() returns."""
    ckpt = load_checkpoint(path)
    keep = bool(ckpt.quantized)
    if as_read:
        quantizer = Quantizer(kind, fuse=fuse)
        model = build_model(ckpt, torch.bfloat16, keep_quantized=keep, quantize_as_read=quantizer.as_read)
    else:
        model = build_model(ckpt, torch.bfloat16, keep_quantized=keep)
    if fuse:
        fuse_projections(model)
    return model, quantizer.finish(model) if as_read else quantize(model, kind)


def _held(model: torch.nn.Module) -> dict:
    """Every weight as the model holds it: parameters, fused projections, Linears' and experts' quantized weights."""
    held = dict(model.state_dict())
    for name, module in model.named_modules():
        if (fused := fused_projection(module)) is not None:
            held[f"{name}:fused"] = (fused[0], fused[2])
        if isinstance(getattr(module, "quantized", None), QuantizedWeight):
            held[f"{name}:quantized"] = module.quantized
        if isinstance(module, Experts):
            held.update({f"{name}.{stack}:quantized": blocks for stack, blocks in (module.quantized or {}).items()})
    return held


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, QuantizedWeight):
        return type(a) is type(b) and a.shape == b.shape and _same(a.tensors(), b.tensors())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@needs_kernel
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("name", [*CHECKPOINTS, "gguf"])
def test_quantized_as_read_is_quantized_after_the_load_bit_for_bit(request, name, kind, fuse):
    """Each weight, fused projection and experts' stack in the same format with the same bits, the same counts; the
    GGUF's kept blocks (and the float members fused with them, joined by finish) as quantize leaves them."""
    path = _path(request, name)
    after, after_counts = _load(path, kind, fuse, as_read=False)
    read, read_counts = _load(path, kind, fuse, as_read=True)
    assert read_counts == after_counts and sum(read_counts.values()) > 0
    held_after, held_read = _held(after), _held(read)
    assert held_read.keys() == held_after.keys()
    assert [n for n in held_after if not _same(held_read[n], held_after[n])] == []
    if name == "gguf":
        assert read_counts["kept"] > 0


def _old_route(monkeypatch) -> None:
    """LLMs loaded while this is in place quantize once loaded, as before quantizing as read."""
    monkeypatch.setattr(CpuRunner, "quantizer", Runner.quantizer)


@needs_kernel
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("name", ["dense", "moe"])
def test_logits_and_greedy_tokens_are_those_of_quantizing_after_the_load(request, monkeypatch, name, kind):
    path = _path(request, name)
    config = RunnerConfig.from_env(tiles=False)
    read = mtpx.LLM(path, dtype=kind, runner_config=config)
    with monkeypatch.context() as m:
        _old_route(m)
        after = mtpx.LLM(path, dtype=kind, runner_config=config)
    prompt = read.tokenizer.encode("def add(a, b):\n    return")
    assert torch.equal(read.logits(prompt), after.logits(prompt))
    tokens = [llm.generate(prompt, max_tokens=12, ignore_eos=True, spec_type="none").token_ids for llm in (read, after)]
    assert tokens[0] == tokens[1]


class _Tracked:
    """A checkpoint's loaders giving each tensor in bf16 in memory of its own (an ndarray, which a weak reference
    watches): how many bytes of the tensors read are alive at any moment."""

    def __init__(self, ckpt):
        self.read: list[tuple[weakref.ref, int]] = []
        ckpt.tensors = {n: self._tracked(load) for n, load in ckpt.tensors.items()}

    def _tracked(self, load):
        def tracked() -> torch.Tensor:
            tensor = load().to(torch.bfloat16)
            array = np.empty(tensor.numel(), dtype=np.int16)
            own = torch.from_numpy(array).view(torch.bfloat16).reshape(tensor.shape)
            own.copy_(tensor)
            self.read.append((weakref.ref(array), own.numel() * own.element_size()))
            return own
        return tracked

    def alive(self) -> int:
        return sum(size for array, size in self.read if array() is not None)


def _layer_bytes(shapes: dict) -> dict[str, int]:
    """bf16 bytes of each decoder layer's tensors (the MTP layer's counting as one), and of the others."""
    layers: dict[str, int] = {}
    for name, shape in shapes.items():
        parts = name.split(".")
        layer = ".".join(parts[:3]) if parts[1] == "layers" or parts[:2] == ["mtp", "layers"] else parts[0]
        layers[layer] = layers.get(layer, 0) + 2 * int(np.prod(shape))
    return layers


@needs_kernel
@pytest.mark.parametrize("name", ["dense", "moe", "qwen3-next"])
def test_the_bf16_alive_while_loading_is_about_a_layer_not_the_model(request, name):
    """At most one layer's bf16 weights (a fused projection's members until the last is read) besides the bf16 the
    model keeps (embedding, norms), where quantizing after the load holds every weight in bf16 first."""
    peaks = {}
    for as_read in (False, True):
        ckpt = load_checkpoint(_path(request, name))
        tracked, quantizer, peak = _Tracked(ckpt), Quantizer("int4", fuse=True), 0

        def probe(model, n, tensor) -> bool:
            nonlocal peak
            taken = as_read and quantizer.as_read(model, n, tensor)
            peak = max(peak, tracked.alive())
            return taken
        model = build_model(ckpt, torch.bfloat16, quantize_as_read=probe)
        kept = tracked.alive()  # the weights the model keeps in bf16
        peaks[as_read] = (peak, kept)
        del model
    layers = _layer_bytes(ckpt.shapes)
    whole, largest = sum(layers.values()), max(v for k, v in layers.items() if ".layers." in k)
    (after, _), (read, kept) = peaks[False], peaks[True]
    assert after == whole
    assert read <= kept + largest and read < 0.5 * whole
