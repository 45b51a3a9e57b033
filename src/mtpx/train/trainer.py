"""Training: a Qwen3.5-architecture model with its MTP layer (joint loss), and MTP-only self-distillation.

Joint loss (DeepSeek-V3 style): CE(next token) + λ · CE(MTP's prediction of the token after next). Batches are a
pure function of (seed, step), so resuming from a checkpoint continues exactly as an uninterrupted run.
Training state is saved as safetensors + JSON (no pickle).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mtpx.config import ModelConfig
from mtpx.errors import MtpxError
from mtpx.runners.cpu import tune_cpu_process
from mtpx.models.glm4_moe import MTP as NextNMTP, Glm4MoeModel
from mtpx.models.interface import CausalLM
from mtpx.models.qwen3_5 import MTP, Qwen35Model
from mtpx.train.corpus import CHAT_TEMPLATE, DOC_SEPARATOR, SPECIAL_TOKENS
from mtpx.train.head_loss import compiled_blocks, linear_cross_entropy


PRECISIONS = ("auto", "bf16", "fp32")
COMPILE = ("auto", "on", "off")


@dataclass
class TrainConfig:
    steps: int = 600
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.1
    mtp_weight: float = 0.3
    mtp_steps: int = 1  # chained MTP draft steps trained (step j > 1 feeds back the MTP's own output, as drafting does)
    grad_clip: float = 1.0
    seed: int = 0
    val_every: int = 100
    save_every: int = 100
    val_batches: int = 8
    # matmuls in "bf16" (autocast; weights and optimizer stay fp32) or "fp32"; "auto": bf16 only where the CPU has
    # bf16 dot products; elsewhere oneDNN emulates them and fp32 trains ~2x faster
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    stop_after: int = 0  # stop (and save the training state) after this many steps; 0 = run to `steps`
    device: str = "cpu"  # "cuda" (or "cuda:N") trains on a GPU, under bf16 autocast unless --precision fp32
    # torch.compile the decoder layers and the loss blocks: fewer, fused kernels per step, after ~20-60 s of compiling
    # (cached across runs); "auto": on CPU only, where it has been shown to pay
    compile: str = field(default="auto", metadata={"choices": COMPILE})


def mixed_precision(precision: str, device: str = "cpu") -> torch.autocast:
    """The autocast context a training step on `device` runs its matmuls under."""
    if precision not in PRECISIONS:
        raise MtpxError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    from mtpx import kernels
    kind = torch.device(device).type
    native = torch.cuda.is_bf16_supported() if kind == "cuda" else kernels.native_bf16()
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16" or (precision == "auto" and native))


@contextlib.contextmanager
def compiled_for_training(model: Qwen35Model, setting: str, device: torch.device):
    """Within this context each decoder layer (main stack and MTP) and the loss blocks run compiled, as `setting`
    (TrainConfig.compile) says. Layers rather than the whole model: the model's forward holds the inference paths'
    dispatch, and one graph per layer compiled in 37 s against 150 s (two compilations) for the same step time. On
    leaving, the layers run eagerly again, so the inference paths (other shapes, other modes) never meet the training
    graphs."""
    if setting not in COMPILE:
        raise MtpxError(f"compile must be one of {', '.join(COMPILE)}, got {setting!r}")
    enabled = setting == "on" or (setting == "auto" and device.type == "cpu")
    layers = list(model.model.layers) + (list(model.mtp.layers) if model.mtp is not None else [])
    if enabled:
        for layer in layers:
            layer.compile()
    try:
        with compiled_blocks(enabled):
            yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: back to the eager forward


def training_device(name: str) -> torch.device:
    """The device `--device` names, checked: an unusable one is an error that says so, not a CUDA traceback."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise MtpxError(f"--device {name!r} is not a device name (cpu, cuda, cuda:N)") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MtpxError(f"--device {name}: this PyTorch sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MtpxError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise MtpxError(f"--device {name}: training runs on cpu or cuda")
    return device


def train_tokenizer(text_files: list[Path], vocab_size: int, out: Path) -> None:
    """Byte-level BPE with the chat special tokens; writes tokenizer.json and tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from mtpx.loading.gguf import QWEN35_SPLIT
    tok = Tokenizer(models.BPE())
    # Qwen3.5's own split (llama.cpp knows it as "qwen35"): a line break never merges with the next line's
    # indentation, so a prompt that ends in "\n" ends on a boundary the model saw in training; digits split singly
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN35_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def docs():
        for f in text_files:
            yield from f.read_text(encoding="utf-8").split(DOC_SEPARATOR)
    tok.train_from_iterator(docs(), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_config(out)


def write_tokenizer_config(out: Path) -> None:
    (out / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}, indent=1))


def tokenize_file(tokenizer, path: Path) -> torch.Tensor:
    """All documents of a corpus file, each followed by <|endoftext|>, as one int32 tensor."""
    eot = tokenizer.token_to_id(DOC_SEPARATOR)
    ids: list[int] = []
    for doc in path.read_text(encoding="utf-8").split(DOC_SEPARATOR):
        if doc.strip():
            ids.extend(tokenizer.encode(doc))
            ids.append(eot)
    return torch.tensor(ids, dtype=torch.int32)


def batch_at(data: torch.Tensor, step: int, seed: int, batch: int, seq_len: int) -> torch.Tensor:
    """Random windows of seq_len + 1 tokens; a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g)
    return torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).long()


def init_weights(model: Qwen35Model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_layers = len(model.model.layers)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "conv1d" not in name:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def mtp_chain(model: Qwen35Model, hidden: torch.Tensor, x: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """MTP outputs for draft steps 1..steps over a teacher-forced sequence x [B, L] with main hidden states [B, L, H].

    Step 1 at position i sees (h_i, x_{i+1}); step j > 1 sees (the step j - 1 output at i, x_{i+j}), the recursion
    k-token drafting uses. The step-j output at position i predicts x_{i+j+1}; it has L - j positions."""
    outs, h = [], hidden
    for j in range(1, steps + 1):
        T = x.shape[1] - j
        if T <= 0:
            break
        h = model.mtp_forward(h[:, :T], x[:, j:j + T])
        outs.append(h)
    return outs


def losses(model: Qwen35Model, batch: torch.Tensor, mtp_steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token CE, MTP CE averaged over the chained draft steps) for a batch of windows [B, L + 1]."""
    x, y = batch[:, :-1], batch[:, 1:]
    hidden = model(x)
    head = lambda h, targets: linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.lm_head.weight, targets.flatten())
    main = head(hidden, y)
    if model.mtp is None:
        return main, torch.zeros((), device=main.device)
    terms = [head(h, y[:, j:j + h.shape[1]]) for j, h in enumerate(mtp_chain(model, hidden, x, mtp_steps), start=1)]
    return main, sum(terms) / len(terms)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_train_state(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, extra: dict) -> None:
    """Model + optimizer tensors in safetensors, counters in JSON; written to a temp dir then renamed."""
    tmp, final = out / "train_state.tmp", out / "train_state"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "lm_head" not in k or
               not getattr(model, "cfg", None) or not model.cfg.tie_word_embeddings}, str(tmp / "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, meta = {}, {"step": step, **extra, "param_groups": [], "state": {}}
    for gi, group in enumerate(opt.param_groups):
        meta["param_groups"].append({k: v for k, v in group.items() if k != "params"})
        meta["param_groups"][-1]["params"] = [names[id(p)] for p in group["params"]]
    for p, st in opt.state.items():
        n = names[id(p)]
        meta["state"][n] = {"step": float(st["step"])}
        tensors[n + ".exp_avg"], tensors[n + ".exp_avg_sq"] = st["exp_avg"].cpu(), st["exp_avg_sq"].cpu()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def load_train_state(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    d = out / "train_state"
    sd = load_file(str(d / "model.safetensors"))
    missing = set(model.state_dict()) - set(sd) - {"lm_head.weight"}
    if missing:
        raise MtpxError(f"cannot resume: training state lacks {sorted(missing)[:3]}")
    model.load_state_dict(sd, strict=False)
    meta = json.loads((d / "state.json").read_text())
    tensors = load_file(str(d / "optimizer.safetensors"))
    params = dict(model.named_parameters())
    for n, st in meta["state"].items():
        p = params[n]
        opt.state[p] = {"step": torch.tensor(st["step"]), "exp_avg": tensors[n + ".exp_avg"].to(p.device),
                        "exp_avg_sq": tensors[n + ".exp_avg_sq"].to(p.device)}
    return meta


def save_checkpoint(model: Qwen35Model, tok_dir: Path, out: Path, dtype: torch.dtype = torch.bfloat16,
                    card: str | None = None) -> None:
    """A standard checkpoint directory other engines read: config, safetensors (with mtp.*), tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    hf = cfg.to_hf_dict()
    if model.mtp is not None:
        hf["mtp_num_hidden_layers"] = len(model.mtp.layers)
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
               if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tok_dir / name).resolve() != (out / name).resolve():
            shutil.copy(tok_dir / name, out / name)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg.eos_token_id}, indent=1))
    if card:
        (out / "README.md").write_text(card)


def evaluate(model: Qwen35Model, data: torch.Tensor, tc: TrainConfig) -> tuple[float, float]:
    model.eval()
    main_sum = mtp_sum = 0.0
    with torch.no_grad():
        for i in range(tc.val_batches):
            with mixed_precision(tc.precision, tc.device):
                batch = batch_at(data, i, 12345, tc.batch_size, tc.seq_len).to(tc.device)
                m, t = losses(model, batch, tc.mtp_steps)
            main_sum, mtp_sum = main_sum + m.item(), mtp_sum + t.item()
    model.train()
    return main_sum / tc.val_batches, mtp_sum / tc.val_batches


def train(model: Qwen35Model, train_data: torch.Tensor, val_data: torch.Tensor, tc: TrainConfig, out: Path,
          resume: bool = False, log=print) -> list[float]:
    """Train on tc.device (fp32 weights and optimizer state); returns the training losses per step (for tests)."""
    device = training_device(tc.device)
    if device.type == "cpu":
        tune_cpu_process()
    model.to(device)
    with compiled_for_training(model, tc.compile, device):
        return _train_loop(model, train_data, val_data, tc, out, device, resume, log)


def _train_loop(model: Qwen35Model, train_data: torch.Tensor, val_data: torch.Tensor | None, tc: TrainConfig,
                out: Path, device: torch.device, resume: bool, log) -> list[float]:
    opt = make_optimizer(model, tc)
    start = 0
    if resume and (out / "train_state" / "state.json").exists():
        start = load_train_state(out, model, opt)["step"]
        log(f"resumed at step {start}")
    model.train()
    history = []
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc="train", dynamic_ncols=True)
    t0, tokens = time.perf_counter(), 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        batch = batch_at(train_data, step, tc.seed, tc.batch_size, tc.seq_len).to(device)
        with mixed_precision(tc.precision, tc.device):
            main, mtp = losses(model, batch, tc.mtp_steps)
        loss = main + tc.mtp_weight * mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.grad_clip)
        opt.step()
        history.append(loss.item())
        tokens += batch.numel()
        bar.set_postfix(loss=f"{main.item():.3f}", mtp=f"{mtp.item():.3f}",
                        tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        done = step + 1
        if tc.val_every and done % tc.val_every == 0 and val_data is not None:
            v, vm = evaluate(model, val_data, tc)
            log(f"step {done}: val loss {v:.3f}, val mtp loss {vm:.3f}")
        stopping = tc.stop_after and done >= tc.stop_after
        if (tc.save_every and (done % tc.save_every == 0 or done == tc.steps)) or stopping:
            save_train_state(out, model, opt, done, {"train_config": asdict(tc)})
        if stopping:
            log(f"stopped after step {done} (--stop-after)")
            break
    return history


def new_model(cfg: ModelConfig, mtp_layers: int, seed: int) -> Qwen35Model:
    torch.manual_seed(seed)
    model = Qwen35Model(cfg, mtp_layers)
    init_weights(model, seed)
    return model


def new_mtp_module(model: CausalLM) -> torch.nn.Module:
    """A freshly initialised MTP module of the model's family: Qwen3.5 / Qwen3-Next's `mtp.*` layer, or GLM-4.5 /
    DeepSeek-V3's nextn decoder layer (with the model's own attention, MLA for DeepSeek)."""
    if isinstance(model, Glm4MoeModel):
        return NextNMTP(model.cfg, model.ATTENTION)
    if isinstance(model, Qwen35Model):
        return MTP(model.cfg, 1)
    raise MtpxError(f"train-mtp does not know how to build an MTP layer for {type(model).__name__} "
                    f"(model_type {model.cfg.model_type!r})")


def fresh_mtp(model: CausalLM, seed: int) -> None:
    """Give a model a new, trainable MTP layer of its family (replacing any existing one)."""
    torch.manual_seed(seed)
    model.mtp = new_mtp_module(model)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.mtp.named_parameters():
        if p.dim() >= 2:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
