"""`mtpx serve`: its flags, and the server they describe (app.py) run under uvicorn."""
from __future__ import annotations

import argparse
import logging
import sys

from mtpx.engine.flags import add_spec_arguments, model_has_mtp, spec_from_args
from mtpx.serve.app import LOCAL_HOSTS, Limits, Server, uvicorn_server
from mtpx.serve.output import REASONING_FORMATS


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mtpx.commands.run import add_model_arguments
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* and /metrics")
    p.add_argument("--allowed-hosts", type=_csv, default=[],
                   help="without --api-key, Host headers accepted besides localhost, 127.0.0.1, ::1 and --host "
                   "(comma-separated; '*' any)")
    p.add_argument("--cors-origins", type=_csv, default=[],
                   help="origins a web page may call the API from (comma-separated, '*' any; default none)")
    d = Limits()
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help=f"largest request body; larger ones get a 413 (default {d.max_request_bytes})")
    p.add_argument("--max-stop", type=int, default=d.max_stop,
                   help=f"most stop strings per request (default {d.max_stop})")
    p.add_argument("--max-stop-length", type=int, default=d.max_stop_length,
                   help=f"longest stop string, in characters (default {d.max_stop_length})")
    p.add_argument("--max-dry-breakers", type=int, default=d.max_dry_breakers,
                   help=f"most DRY sequence breakers per request (default {d.max_dry_breakers})")
    p.add_argument("--max-dry-breaker-length", type=int, default=d.max_dry_breaker_length,
                   help=f"longest DRY sequence breaker, in characters (default {d.max_dry_breaker_length})")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may take to finish before they are ended "
                   "(default 30)")
    p.add_argument("--served-model-name", default=None, help="model id reported by /v1/models (default: the "
                   "checkpoint directory's name)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="most sequences decoded together (default 32)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--reasoning-format", default="auto", choices=list(REASONING_FORMATS),
                   help="chat answers' <think>...</think>: into reasoning_content (deepseek; auto: when the chat "
                   "template has think blocks) or left in content (none)")
    p.add_argument("--default-max-tokens", type=int, default=1024,
                   help="max_tokens for chat requests that give none (default 1024, capped by the context)")
    add_spec_arguments(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="default info")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from mtpx.commands.run import load_model
    llm = load_model(args)
    name = args.served_model_name or ("demo" if args.model == "demo" else None)
    limits = Limits(max_request_bytes=args.max_request_bytes, max_stop=args.max_stop,
                    max_stop_length=args.max_stop_length, max_dry_breakers=args.max_dry_breakers,
                    max_dry_breaker_length=args.max_dry_breaker_length)
    wildcard = args.host in ("0.0.0.0", "::", "")  # any address of this machine: the Host header cannot be checked
    server = Server(llm, model_name=name, spec=spec_from_args(args, model_has_mtp(llm)), api_key=args.api_key,
                    max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                    default_max_tokens=args.default_max_tokens, reasoning_format=args.reasoning_format,
                    limits=limits, shutdown_timeout=args.shutdown_timeout,
                    allowed_hosts=[args.host, *args.allowed_hosts, *(["*"] if wildcard else [])],
                    cors_origins=args.cors_origins)
    if args.host not in LOCAL_HOSTS and not args.api_key:
        print(f"mtpx serve: warning: listening on {args.host} without --api-key: anyone who can reach this port can "
              "use the model", file=sys.stderr)
    spec = server.spec.kind + (f" ({server.spec.spec_draft_policy}, k <= {server.spec.spec_draft_n_max})"
                               if server.spec.speculative else "")
    print(f"mtpx serve: model {server.model_name} ({llm.path}), speculation {spec}, "
          f"chat page and API at http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn_server(server, args.host, args.port, args.log_level).run()
    return 0
