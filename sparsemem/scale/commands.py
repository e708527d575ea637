"""`sparsemem compile` (AOT fit check on a TPU topology) and `sparsemem distributed` (multi-process runs).

The command imports jax and the experiment stack when it runs, so `sparsemem --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def _mesh(config, text: str | None) -> dict[str, int]:
    """The run's mesh axes (`mesh.*` of the config), then `--mesh data=4,fsdp=4` on top."""
    from sparsemem.parallel.mesh import MESH_AXES  # noqa: PLC0415

    shape = {axis: int(config.mesh[axis]) for axis in MESH_AXES if axis in config.mesh}
    for item in filter(None, (text or "").split(",")):
        axis, _, size = item.partition("=")
        if axis not in MESH_AXES or not size.isdigit():
            raise ValueError(f"--mesh item {item!r} is not AXIS=SIZE with AXIS in {MESH_AXES}")
        shape[axis] = int(size)
    return shape


def _model_config(config, preset_name: str | None):
    from etils import epath  # noqa: PLC0415

    from sparsemem.models.config import PRESETS, from_hf_config, preset  # noqa: PLC0415

    if preset_name:
        return preset(preset_name)
    path = epath.Path(config.model.path or ".") / "config.json"
    if config.model.source != "hf" or not path.exists():
        where = f"model.source={config.model.source!r}" if config.model.source != "hf" else f"no {path}"
        raise ValueError(f"{where}: compile reads the architecture from a Hugging Face config.json; "
                         f"pass --model PRESET instead (known: {', '.join(sorted(PRESETS))})")
    return from_hf_config(json.loads(path.read_text()))


def _num_domains(config, given: int | None) -> int:
    if given:
        return given
    if config.data.corpus in ("libreoffice_help", "wiki40b"):  # one domain per language
        return len(config.data.languages)
    raise ValueError(f"data.corpus={config.data.corpus!r}: pass --domains N (the number of domains of the corpus)")


def _compile(args: argparse.Namespace) -> int:
    import jax  # noqa: PLC0415

    jax.config.update("jax_platforms", "cpu")  # the topology's devices are compile-only; no accelerator needed
    # Executables for compile-only devices cannot be loaded back from the persistent cache (jax warns at each step).
    jax.config.update("jax_enable_compilation_cache", False)
    from sparsemem.experiment.config import apply_overrides, koff_config, load_config  # noqa: PLC0415
    from sparsemem.scale import aot, topology  # noqa: PLC0415

    config = apply_overrides(load_config(args.config), args.set or [])
    topo = topology.resolve(args.topology)
    cfg = _model_config(config, args.model)
    kcfg = koff_config(config, _num_domains(config, args.domains), args.variant)
    mesh = _mesh(config, args.mesh)
    # Batch sizes in a config are per process (each host's data shard); the global batch stacks them.
    hosts = topo.num_hosts
    log.info("compiling %s for %s (%d chips, %d hosts), mesh %s", args.config, topo.name, topo.num_chips, hosts, mesh)
    report = aot.compile_koff(cfg, kcfg, topo, mesh, batch=config.data.batch_size * hosts, seq_len=config.data.seq_len,
                              eval_batch=config.eval.batch_size * hosts, eval_seq_len=config.eval.seq_len,
                              param_dtype=config.model.param_dtype)
    print(aot.format_report(report, args.step_time))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(aot.as_dict(report), f, indent=1, default=str)
    return 0 if report.fits else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compile", help="compile the KOFF train step and evaluation program for a TPU topology (no TPU, no weights): fit and FLOPs; "
                        "exit status 1 if a step does not fit in HBM")
    p.add_argument("--config", required=True, help="experiments/configs/<name>.py")
    p.add_argument("--topology", required=True, help="Cloud TPU slice, e.g. v5p-8, v5p-32, v4-8, v5e-16, v6e-8, "
                                                     "2xv5p-32 (two slices)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--model", help="model preset for the architecture instead of model.path's config.json")
    p.add_argument("--mesh", help="mesh axes, e.g. data=4,fsdp=4 (default: the config's mesh.*)")
    p.add_argument("--domains", type=int, help="number of domains (default: from the config's corpus)")
    p.add_argument("--variant", default="koff", help="trained variant whose step is compiled (default koff)")
    p.add_argument("--step-time", type=float, help="seconds per train step: print the MFU it means")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=_compile)
