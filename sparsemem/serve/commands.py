"""`sparsemem generate`: continue text prompts with a model or an exported run.

`generate` continues prompts with a model folder (default: the embedded Gemma-3-270M) or, with
`--run`, with the compacted backbone and memory modules written by `sparsemem export`
(registered with the run commands: it reads a run directory); `--domain` picks each
prompt's memory module, or `auto` routes the prompt to the module whose routing centroid
is nearest (`sparsemem.serve.routing`). The command imports jax and the model code when
it runs, so `sparsemem --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import time

log = logging.getLogger(__name__)


def _model_folder(model: str | None):
    if model:
        return model
    from sparsemem.checkpoints.gguf import demo_model_dir  # the demo extra is only needed for the default

    return demo_model_dir()


def export_folder(run: str, variant: str) -> pathlib.Path:
    """The export folder given itself, its run directory, or the run's `export/` folder."""
    path = pathlib.Path(run)
    for candidate in (path, path / variant / "serve", path / "export" / variant / "serve"):
        if (candidate / "backbone" / "config.json").exists():
            return candidate
    raise FileNotFoundError(f"no exported backbone in {path}, {path / variant / 'serve'} or "
                            f"{path / 'export' / variant / 'serve'}; "
                            f"run `sparsemem export --run {run} --variant {variant}` first")


def _domains(args: argparse.Namespace) -> list[str] | None:
    if not args.domain:
        return None
    if len(args.domain) == 1:
        return args.domain * len(args.prompt)
    if len(args.domain) != len(args.prompt):
        raise SystemExit(f"error: {len(args.domain)} --domain flags for {len(args.prompt)} prompts; "
                         "give one domain for all prompts or one per prompt")
    return args.domain


def generate(args: argparse.Namespace) -> int:
    from sparsemem.checkpoints.memory_module import ModuleMismatchError  # noqa: PLC0415
    from sparsemem.serve.memory import UnknownDomainError  # noqa: PLC0415
    from sparsemem.serve.routing import RoutingError  # noqa: PLC0415

    try:
        return _generate(args)
    except (UnknownDomainError, ModuleMismatchError, RoutingError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


def _generate(args: argparse.Namespace) -> int:
    from sparsemem.checkpoints.hf import load_hf_checkpoint, load_tokenizer  # noqa: PLC0415
    from sparsemem.serve.generate import SamplingConfig, generate_text  # noqa: PLC0415

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              seed=args.seed)
    start = time.perf_counter()
    if args.run:
        if args.model:
            raise SystemExit("error: give either --model or --run, not both")
        from sparsemem.serve.deploy import Deployment  # noqa: PLC0415

        folder = export_folder(args.run, args.variant)
        log.info("loading %s", folder)
        deployment = Deployment.load(folder, offload=args.offload_memory)
        log.info("loaded in %.1fs (domains: %s); generating", time.perf_counter() - start,
                 ", ".join(deployment.domains) or "none")
        domains = _domains(args)
        if domains is not None and "auto" in domains and deployment.tokenizer is not None:
            routed = deployment.resolve_domains(deployment.tokenizer.encode_batch(args.prompt), domains)
            log.info("routed: %s", ", ".join(routed))
        continuations = deployment.generate_text(args.prompt, domains, sampling)
    else:
        if args.domain:
            raise SystemExit("error: --domain needs --run (an exported run with memory modules)")
        folder = _model_folder(args.model)
        log.info("loading %s", folder)
        model = load_hf_checkpoint(folder)
        tokenizer = load_tokenizer(folder, model.cfg)
        log.info("loaded in %.1fs; generating", time.perf_counter() - start)
        continuations = generate_text(model, tokenizer, args.prompt, sampling)
    for prompt, continuation in zip(args.prompt, continuations):
        print(f"{prompt}{continuation}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="continue text prompts with a model or an exported run",
                                   description=__doc__)
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat the flag for a batch of prompts")
    parser.add_argument("--model", help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json); "
                                        "default: the embedded Gemma-3-270M demo model")
    parser.add_argument("--run", help="run directory (or export folder) written by `sparsemem export`")
    parser.add_argument("--variant", default="koff", help="with --run: the exported variant (default: koff)")
    parser.add_argument("--domain", action="append",
                        help="with --run: memory module to use, or 'auto' to route each prompt; once for all "
                             "prompts or once per prompt")
    parser.add_argument("--offload-memory", action="store_true",
                        help="with --run: keep the memory table in host memory, fetch rows per batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=generate)
