"""`sparsemem` command line: each subsystem registers its own subcommands.

Exit status: 0 done, 1 an error (one line naming the problem and the fix; `--debug` shows
the traceback), 2 bad arguments, 75 preempted (SIGTERM; rerun the same command to resume),
130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules exposing `register(subparsers)`; each adds its subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = (
    "sparsemem.data.commands",
    "sparsemem.serve.commands",
    "sparsemem.serve.serve_command",
    "sparsemem.experiment.commands",
    "sparsemem.scale.commands",
)
EXIT_ERROR, EXIT_PREEMPTED, EXIT_CTRL_C = 1, 75, 130  # 75 is EX_TEMPFAIL: "try again later"
# What a user's input or files can cause (bad config, missing or damaged file, full disk, ...).
USER_ERRORS = (ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsemem", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def config_flags_as_set(argv: list[str]) -> list[str]:
    """`--config.train.steps=20` and `--config.train.steps 20` (the `ml_collections.config_flags` spelling that
    big_vision and MaxText users type) as `--set train.steps=20`; every other argument unchanged."""
    out, args = [], iter(argv)
    for arg in args:
        if not arg.startswith("--config."):
            out.append(arg)
            continue
        key, sep, value = arg.removeprefix("--config.").partition("=")
        value = value if sep else next(args, None)
        out += ["--set", key if value is None else f"{key}={value}"]  # no value: `--set` names the problem
    return out


def use_compilation_cache() -> None:
    """Keep compiled XLA programs on disk, so a resumed run, the next seed or a restarted server loads
    them instead of compiling again: `$JAX_COMPILATION_CACHE_DIR` if set, else `<cache>/xla` under
    the sparsemem cache (`$SPARSEMEM_CACHE`, default `~/.cache/sparsemem`). `JAX_ENABLE_COMPILATION_CACHE=false`
    turns it off."""
    import jax

    from sparsemem.checkpoints.gguf import cache_root

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(config_flags_as_set(sys.argv[1:] if argv is None else argv))
    use_compilation_cache()
    if args.debug:
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); rerun the same command to resume", file=sys.stderr)
        return EXIT_CTRL_C
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
