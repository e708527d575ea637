"""`sparsemem serve`: the OpenAI-compatible HTTP server (`sparsemem.serve.server`) for an export or a model folder.

Needs the `serve` extra (aiohttp): `pip install -e '.[serve]'`.
"""

from __future__ import annotations

import argparse
import logging
import time

log = logging.getLogger(__name__)


def serve(args: argparse.Namespace) -> int:
    from sparsemem.checkpoints.memory_module import ModuleMismatchError  # noqa: PLC0415
    from sparsemem.serve.commands import _model_folder, export_folder  # noqa: PLC0415
    from sparsemem.serve.scheduler import Scheduler, ServedModel  # noqa: PLC0415

    try:
        from sparsemem.serve import server  # noqa: PLC0415
    except ImportError as err:
        raise SystemExit(f"error: `sparsemem serve` needs aiohttp ({err}); pip install -e '.[serve]'") from None
    if args.export and args.model:
        raise SystemExit("error: give either --export or --model, not both")
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
        scheduler = Scheduler(served, max_batch=args.max_batch, max_queue=args.max_queue,
                              window_s=args.batch_window_ms / 1000)
    except (ModuleMismatchError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    context = min(args.context, served.model.cfg.max_seq_len)
    log.info("loaded in %.1fs; serving %s (domains: %s) on http://%s:%d, context %d tokens",
             time.perf_counter() - start, served.name, ", ".join(served.domains) or "none", args.host, args.port,
             context)
    server.run(scheduler, host=args.host, port=args.port, context=context, drain_timeout_s=args.drain_timeout)
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
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8, help="rows batched into one model step")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    parser.add_argument("--batch-window-ms", type=float, default=5.0,
                        help="how long the first waiting request waits for others to batch with")
    parser.add_argument("--context", type=int, default=2048, help="max prompt + max_tokens per request")
    parser.add_argument("--offload-memory", action="store_true",
                        help="keep the memory table in host memory, fetch rows per batch")
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds SIGTERM waits for in-flight requests before exiting")
    parser.set_defaults(func=serve)
