"""`sparsemem serve`: the OpenAI-compatible HTTP server (`sparsemem.serve.server`) for an export or a model folder.

Needs the `serve` extra (aiohttp): `pip install -e '.[serve]'`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import time

log = logging.getLogger(__name__)
KEY_VARIABLE = "SPARSEMEM_API_KEY"  # one key or several, comma-separated


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def serve(args: argparse.Namespace) -> int:
    from sparsemem.checkpoints.memory_module import ModuleMismatchError  # noqa: PLC0415
    from sparsemem.serve.commands import _model_folder, export_folder  # noqa: PLC0415
    from sparsemem.serve.scheduler import ContinuousScheduler, ServedModel, StaticScheduler  # noqa: PLC0415

    try:
        from sparsemem.serve import server  # noqa: PLC0415
    except ImportError as err:
        raise SystemExit(f"error: `sparsemem serve` needs aiohttp ({err}); pip install -e '.[serve]'") from None
    if args.export and args.model:
        raise SystemExit("error: give either --export or --model, not both")
    if not 0 <= args.port <= 65535:
        raise SystemExit(f"error: --port must be in 0..65535, got {args.port}")
    api_keys = tuple(args.api_key or ()) + tuple(k for k in os.environ.get(KEY_VARIABLE, "").split(",") if k.strip())
    if not api_keys and not is_loopback(args.host) and not args.no_api_key:
        raise SystemExit(f"error: --host {args.host} is reachable from other machines and no API key is set; set one "
                         f"with {KEY_VARIABLE}=<key> (or --api-key), or pass --no-api-key to serve it open on purpose")
    start = time.perf_counter()
    try:
        if args.export:
            folder = export_folder(args.export, args.variant)
            log.info("loading %s", folder)
            served = ServedModel.from_export(folder, offload=args.offload_memory, name=args.name or "backbone")
        else:
            folder = _model_folder(args.model)
            log.info("loading %s", folder)
            served = ServedModel.from_hf(folder, name=args.name)
        context = min(args.context, served.model.cfg.max_seq_len)
        if args.batching == "static":
            scheduler = StaticScheduler(served, max_batch=args.max_batch, max_queue=args.max_queue,
                                        window_s=args.batch_window_ms / 1000)
        else:
            scheduler = ContinuousScheduler(served, context=context, max_batch=args.max_batch,
                                            max_queue=args.max_queue)
    except (ModuleMismatchError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    log.info("loaded in %.1fs; serving %s (domains: %s) on http://%s:%d, context %d tokens, %s",
             time.perf_counter() - start, served.name, ", ".join(served.domains) or "none", args.host, args.port,
             context, f"{len(api_keys)} API key(s)" if api_keys else "no API key")
    try:
        server.run(scheduler, host=args.host, port=args.port, context=context, drain_timeout_s=args.drain_timeout,
                   request_timeout_s=args.request_timeout or None, api_keys=tuple(k.strip() for k in api_keys),
                   open_metrics=args.open_metrics)
    except OSError as err:  # port taken, address not on this machine, no permission
        raise SystemExit(f"error: cannot listen on {args.host}:{args.port} ({err.strerror or err}); choose another "
                         "--host/--port") from None
    log.info("drained and stopped: %s", scheduler.stats())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server: backbone + per-request domain memory",
                                   description=__doc__)
    parser.add_argument("--export", help="export folder written by `sparsemem export` (or its run directory, or "
                                         "runs/<name>/export)")
    parser.add_argument("--variant", default="koff", help="with --export: the exported variant (default: koff)")
    parser.add_argument("--model", help="plain Hugging Face model folder (no domains); default without --export: "
                                        "the embedded Gemma-3-270M demo model")
    parser.add_argument("--name", help="the backbone's model id in the API (default: 'backbone' for an export, the "
                                       "folder name for --model)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; anything but loopback needs an API key (or --no-api-key)")
    parser.add_argument("--api-key", action="append",
                        help=f"a key clients must send as 'Authorization: Bearer <key>' on /v1/* (repeatable); "
                             f"prefer the {KEY_VARIABLE} environment variable (comma-separated keys), which other "
                             "users cannot read from the process list")
    parser.add_argument("--no-api-key", action="store_true",
                        help="serve a non-loopback --host without a key, on purpose (e.g. behind an authenticating "
                             "proxy)")
    parser.add_argument("--open-metrics", action="store_true",
                        help="serve /metrics without the key (default: behind it when keys are set)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                        help="continuous: requests join and leave the running decode at every step (default); "
                             "static: batches run to the end before the next starts (the old baseline)")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="decode slots (continuous) or rows per batch (static)")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    parser.add_argument("--batch-window-ms", type=float, default=5.0,
                        help="static batching: how long the first waiting request waits for others to batch with")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may take from arrival to its last token before a 504 (0: no limit)")
    parser.add_argument("--context", type=int, default=2048, help="max prompt + max_tokens per request")
    parser.add_argument("--offload-memory", action="store_true",
                        help="keep the memory table in host memory, fetch rows per batch")
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds SIGTERM waits for in-flight requests before exiting")
    parser.set_defaults(func=serve)
