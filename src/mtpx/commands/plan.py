"""`mtpx plan`: the device memory a model needs, from its config and tensor shapes alone (no weight is read)."""
from __future__ import annotations

import argparse
import json

from mtpx.errors import RequestError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="checkpoint directory, .gguf file or 'demo' (or use --shape)")
    p.add_argument("--shape", help="a known model shape instead of a checkpoint (mtpx bench gen-checkpoint's "
                                   "--shape names, e.g. qwen3.6-27b)")
    p.add_argument("--device", default="cuda", help="cuda (adds the runtime's overhead) or cpu (default: cuda)")
    p.add_argument("--memory", help="the device's memory, e.g. 24GiB: says whether the plan fits and, if not, the "
                                    "largest context or the smallest dtype that does")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32", "int8", "int4"],
                   help="weight format (default: auto, as loading does: bf16, or a GGUF's quantized weights as "
                        "stored)")
    p.add_argument("--ctx", type=int, default=4096, help="tokens per sequence, prompt and output (default: 4096)")
    p.add_argument("--parallel", type=int, default=1, help="sequences decoded at once (default: 1)")
    p.add_argument("--spec-draft-n-max", type=int, default=3, help="drafts per round (default: 3)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(args: argparse.Namespace) -> int:
    from mtpx.runners.plan import explain, parse_bytes, plan
    from mtpx.runners.weights import STORED
    if (args.model is None) == (args.shape is None):
        raise RequestError("give a model (checkpoint directory or .gguf) or --shape, not both")
    if args.shape:
        from mtpx.bench.gen_checkpoint import SHAPES, shape_config
        if args.shape not in SHAPES:
            raise RequestError(f"unknown --shape {args.shape!r}: use one of {sorted(SHAPES)}")
        cfg, mtp_layers, kept, stores_quantized = shape_config(args.shape), 1, None, False
    else:
        from mtpx.llm import resolve_model_path
        from mtpx.loading import load_checkpoint
        from mtpx.loading.checkpoint import count_mtp_layers
        from mtpx.loading.checkpoint import kept_types
        ckpt = load_checkpoint(resolve_model_path(args.model))
        cfg, mtp_layers, kept, stores_quantized = ckpt.config, count_mtp_layers(ckpt.shapes), kept_types(ckpt), \
            bool(ckpt.quantized)
    if args.ctx < 1 or args.parallel < 1 or args.spec_draft_n_max < 0:
        raise RequestError("--ctx and --parallel must be >= 1, --spec-draft-n-max >= 0")
    try:
        memory = parse_bytes(args.memory) if args.memory else None
    except ValueError as e:
        raise RequestError(f"--memory: {e}") from None
    dtype = args.dtype
    if dtype == "auto":
        dtype = STORED if stores_quantized else "bf16"
    kept = kept if dtype in ("int8", "int4", STORED) else None  # a GGUF's blocks loaded as they are
    p = plan(cfg, device=args.device, dtype=dtype, context=args.ctx, parallel=args.parallel,
             drafts=args.spec_draft_n_max, mtp_layers=mtp_layers, memory=memory, kept=kept)
    print(json.dumps(p.to_json(), indent=2) if args.json else explain(p, cfg, kept))
    return 0 if p.fits is not False else 3
