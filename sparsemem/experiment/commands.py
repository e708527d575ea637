"""`sparsemem run`, `study`, `analyze`, `compare`, `export`, `extend` and `route` (each imports its stack when it runs)."""

from __future__ import annotations

import argparse
import logging
import os
import signal

from sparsemem.cli import EXIT_PREEMPTED

log = logging.getLogger(__name__)


def _quiet_libraries() -> None:
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO


def _preemptible(work) -> int:
    """Run `work()`; SIGTERM (also outside training, whose own handler saves a checkpoint first) ends it with
    `EXIT_PREEMPTED`, on which launch scripts rerun the same command to resume."""
    from sparsemem.experiment import run as run_lib  # noqa: PLC0415 (imports jax)

    def stop(signum, frame):
        raise run_lib.Interrupted("stopped on SIGTERM outside training; finished phases are kept, rerun the same "
                                  "command to resume")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        work()
    except run_lib.Interrupted as stopped:
        log.warning("%s", stopped)
        return EXIT_PREEMPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _config(args: argparse.Namespace):
    from sparsemem.experiment.config import apply_overrides, load_config  # noqa: PLC0415

    return apply_overrides(load_config(args.config), args.set or [])


def _run(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from sparsemem.experiment import run as run_lib  # noqa: PLC0415 (imports jax)

    config = _config(args)
    return _preemptible(lambda: run_lib.run(config, args.workdir))


def _study(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from sparsemem.experiment import run as run_lib, study  # noqa: PLC0415 (imports jax)

    config = _config(args)
    workdir = args.workdir or run_lib.default_workdir(config)
    if args.report_only:
        study.cells(config)  # refuses a config without budgets
        study.write_report(config, workdir)
        status = 0
    else:
        status = _preemptible(lambda: study.run_study(config, workdir))
    print(os.path.join(workdir, "study.md"))
    return status


def _analyze(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from sparsemem.experiment import run as run_lib  # noqa: PLC0415

    run_lib.analyze_run(args.workdir)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from sparsemem.experiment.report import comparison_table  # noqa: PLC0415
    from sparsemem.experiment.rundir import RunDir  # noqa: PLC0415

    runs = [RunDir(path) for path in args.workdirs]
    unfinished = [str(run.path) for run in runs if run.read_json("eval.json") is None]
    if unfinished:
        raise SystemExit(f"no eval.json in {', '.join(unfinished)}: finish (or resume) those runs with "
                         "`sparsemem run --config ... --workdir ...` first")
    table = comparison_table(runs, tuple(args.paired or ("koff",)))
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


def _export(args: argparse.Namespace) -> int:
    from sparsemem.experiment.run_export import export_run  # noqa: PLC0415

    print(export_run(args.run, args.variant, args.out, round_to=args.round_to, merge_domain=args.merge_domain,
                     routing_layer=args.routing_layer))
    return 0


def _extend(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from sparsemem.experiment import extend as extend_lib  # noqa: PLC0415

    try:
        result = extend_lib.extend(args.run, extend_lib.parse_domains(args.languages, args.folder), args.steps)
    except (extend_lib.ExtendError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    for domain in result["domains"]:
        print(f"{domain}: held-out perplexity with its memory {result['before']['ppl_memory'][domain]:.2f} -> "
              f"{result['after']['ppl_memory'][domain]:.2f} (backbone alone {result['after']['ppl_no_memory'][domain]:.2f})")
    return 0


def _route(args: argparse.Namespace) -> int:
    from sparsemem.checkpoints.memory_module import ModuleMismatchError  # noqa: PLC0415
    from sparsemem.experiment import route as route_lib  # noqa: PLC0415
    from sparsemem.experiment.report import routing_tables  # noqa: PLC0415
    from sparsemem.serve.routing import RoutingError  # noqa: PLC0415

    lengths = tuple(int(n) for n in args.lengths.split(","))
    try:
        result = route_lib.route_run(args.run, args.variant, args.documents, lengths, args.ppl_prompt,
                                     args.continuation, args.batch_size)
    except (RoutingError, ModuleMismatchError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(routing_tables(result))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="train, evaluate, export and report one experiment (resumable)")
    p.add_argument("--config", required=True, help="experiments/configs/<name>.py")
    p.add_argument("--workdir", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set koff.target_sparsity=0.06 or, as with ml_collections' "
                        "config_flags, --config.koff.target_sparsity=0.06 (repeatable)")
    p.set_defaults(func=_run)
    p = subparsers.add_parser("study", help="an experiment at several training budgets x seeds, one report with "
                                            "intervals over seeds and documents (resumable)")
    p.add_argument("--config", required=True, help="experiments/configs/<name>.py with study.budgets")
    p.add_argument("--workdir", default=None, help="study directory (default: runs/<config name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--report-only", action="store_true",
                   help="only (re)write study.md from the finished cells, e.g. while the study runs")
    p.set_defaults(func=_study)
    p = subparsers.add_parser("analyze", help="LAPE neuron specialisation vs the mask of a finished run")
    p.add_argument("--workdir", required=True, help="the run directory")
    p.set_defaults(func=_analyze)
    p = subparsers.add_parser("compare", help="one table row per finished run: perplexity per setting, swap, MC, LAPE")
    p.add_argument("workdirs", nargs="+", help="run directories, e.g. runs/demo_06 runs/demo runs/demo_25")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    p.add_argument("--paired", action="append", metavar="SETTING",
                   help="a setting whose loss each run is compared with the first run's, paired by seed and "
                        "document (repeatable; default: koff)")
    p.set_defaults(func=_compare)
    p = subparsers.add_parser("export", help="compact a trained run's backbone and export its memory modules",
                              description="Export a trained run: compacted backbone + one memory module per "
                                          "domain (see docs/serving.md).")
    p.add_argument("--run", required=True, help="run directory written by `sparsemem run`")
    p.add_argument("--variant", default="koff", help="trained variant to export (default: koff)")
    p.add_argument("--out", help="output folder (default: <run>/export/<variant>/serve)")
    p.add_argument("--round-to", type=int, default=None,
                   help="round kept widths up to a multiple (e.g. 128) by keeping the next-best units")
    p.add_argument("--merge-domain", help="merge this domain's LoRA into the backbone (single-domain serving)")
    p.add_argument("--routing-layer", type=int, default=None,
                   help="block whose mean hidden state routes prompts (default: the middle block)")
    p.set_defaults(func=_export)
    p = subparsers.add_parser("extend", help="add domains to a trained run: new memory modules on its frozen mask "
                                             "and backbone (resumable)")
    p.add_argument("--run", required=True, help="run directory written by `sparsemem run`")
    p.add_argument("--languages", help="help-corpus languages to add, e.g. fr,es")
    p.add_argument("--folder", action="append", metavar="NAME=PATH",
                   help="a folder of .txt/.jsonl documents as domain NAME (repeatable)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: the run's train.steps)")
    p.set_defaults(func=_extend)
    p = subparsers.add_parser("route", help="routing accuracy, routed vs oracle perplexity and routing cost on the "
                                            "held-out text of an exported run's domains")
    p.add_argument("--run", required=True, help="run directory (exported with `sparsemem export`)")
    p.add_argument("--variant", default="koff")
    p.add_argument("--documents", type=int, default=16, help="held-out sequences per domain")
    p.add_argument("--lengths", default="8,16,32,64", help="prompt lengths in tokens")
    p.add_argument("--ppl-prompt", type=int, default=32, help="prompt length before the scored continuation")
    p.add_argument("--continuation", type=int, default=64, help="tokens scored after the prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_route)
