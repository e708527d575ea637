"""Evaluation throughput beside a plain LM-loss forward at the same row shape, on the demo model and corpus.

    python benchmarks/evaluate.py [--documents N --rounds 2 --against REV]

The demo's evaluation (`experiments/configs/demo.py`: whole test pages per language in
`eval.seq_len`-target rows, `eval.batch_size` rows per batch, text after the memory
slots) scored under one setting (KOFF's: a 0/1 mask and the full memory table, both as
a fresh trainer has them) next to the forward-only LM loss (`benchmarks/forward.py`'s
`lm_loss`: every slot a target) of one `[batch_size, seq_len]` batch. Each runs in its
own process (`workers.py`), timed in interleaved rounds (median kept); the pages are
read and tokenised once, by this process. `--against REV` adds the evaluation as
implemented at git revision REV. Printed:
- scored targets/s of the evaluation and its ratio to the forward's tokens/s (slots/s);
- where the rest goes: the rows' padding and re-read context (unscored slots), the
  evaluation's own cost per slot against the forward's, host work (placing batches,
  accumulating losses: overlapped with the device since batches are pipelined), and
  compile time (tracing, lowering and XLA's compile, from JAX's duration events), with
  how many programs the demo's settings compile and what that costs against evaluating
  them all.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np

import hardware
import workers

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "configs" / "demo.py"


def demo_config(documents: int | None):
    from sparsemem.experiment.config import load_config

    config = load_config(DEMO)
    config.eval.documents = documents or config.eval.documents
    return config


def write_pages(config, path: pathlib.Path) -> None:
    """The token ids of the evaluated pages (`[domain][document]`, with BOS), as JSON, read once for every child."""
    from sparsemem.checkpoints.hf import load_tokenizer
    from sparsemem.experiment import setup

    corpus = setup.load_corpus(config)
    tokenizer = load_tokenizer(*_tokenizer_args(config))
    ids = [setup.token_ids(source, tokenizer) for source in corpus.documents]
    train_prefix = setup.prefill_tokens(corpus.train, tokenizer, config.koff.memory_slots).tolist()
    path.write_text(json.dumps({"pages": ids, "prefill": train_prefix, "eos": tokenizer.eos_id,
                                "pad": tokenizer.pad_id, "domains": corpus.names}))


def rows_table(config, counts: list[int]) -> None:
    """For each count of test pages per language: targets, rows, batches and the share of row slots scored."""
    from sparsemem.checkpoints.hf import load_tokenizer
    from sparsemem.experiment import setup

    corpus = setup.load_corpus(config)
    tokenizer = load_tokenizer(*_tokenizer_args(config))
    e = config.eval
    print(f"rows of {e.seq_len} targets (context {e.context}), batch {e.batch_size}")
    print("| pages per language | targets | rows | batches | scored share of the row slots |")
    print("|---|---|---|---|---|")
    for count in counts:
        ids = [setup.token_ids(setup.spread(source, count), tokenizer) for source in corpus.all_documents]
        pages = {"pages": ids, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
        batches = _rows(config, pages).batches
        targets = int(sum(b["loss_mask"].sum() for b in batches))
        rows = int(sum((b["segment_ids"] > 0).any(axis=1).sum() for b in batches))
        print(f"| {count} | {targets} | {rows} | {len(batches)} | "
              f"{targets / (len(batches) * e.batch_size * e.seq_len):.3f} |")


def _tokenizer_args(config):
    from sparsemem.checkpoints.hf import read_config
    from sparsemem.experiment import setup

    folder = setup.model_folder(config)
    return folder, read_config(folder)


def _trainer(config, num_domains: int, prefill: list):
    from sparsemem.experiment import setup
    from sparsemem.experiment.config import koff_config
    from sparsemem.train.trainer import KoffTrainer

    mesh = setup.mesh_for(config)
    decoder, _ = setup.load_model(config, mesh)
    trainer = KoffTrainer(decoder, koff_config(config, num_domains, "koff"), mesh)
    return trainer, trainer.init(np.asarray(prefill, np.int32))


def _rows(config, pages: dict):
    from sparsemem.evaluation.documents import document_batches

    e = config.eval
    return document_batches(pages["pages"], eos_id=pages["eos"], pad_id=pages["pad"], seq_len=e.seq_len,
                            context=e.context, batch_size=e.batch_size, first_position=config.koff.memory_slots)


def evaluation_child(config, pages: dict, count_programs: bool) -> None:
    """One setting's `document_losses` over the pages; says the rows' shares, host seconds and programs."""
    from sparsemem.evaluation.documents import accumulate
    from sparsemem.evaluation.scoring import Scorer, document_losses

    trainer, state = _trainer(config, len(pages["domains"]), pages["prefill"])
    scorer = Scorer.for_trainer(trainer)
    setting = dict(masks=trainer.final_masks(state), memory=state.memory, lora_scale=trainer.kcfg.lora_scale)
    documents = _rows(config, pages)
    segments = np.stack([b["segment_ids"] for b in documents.batches])
    scored = np.stack([b["loss_mask"] for b in documents.batches]) > 0
    start = time.perf_counter()
    for batch in documents.batches:
        trainer.backbone.place_batch({k: v for k, v in batch.items() if k not in ("document", "offset")})
    accumulate(documents, [np.zeros(b["loss_mask"].shape) for b in documents.batches])
    host = time.perf_counter() - start
    info = {"host_seconds": host, "targets": int(scored.sum()), "slots": int(segments.size),
            "padding": float(np.mean(segments == 0)), "context": float(np.mean((segments > 0) & ~scored)),
            "batches": len(documents.batches)}
    info["programs"] = _programs(config, scorer, setting) if count_programs else None
    workers.serve(_timing_first_call(lambda: document_losses(scorer, documents, **setting), info), info)


# JAX's duration events of making a program: tracing, lowering, XLA's compile.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def _timing_first_call(step, info: dict):
    """`step`, writing into `info` the seconds spent compiling in its first call (`workers.serve`'s warm-up),
    from JAX's duration events."""
    import jax

    spent = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: spent.append(seconds) if event in COMPILE_EVENTS else None)

    def timed():
        step()
        info.setdefault("compile_seconds", sum(spent))
    return timed


def _programs(config, scorer, koff_setting: dict) -> int:
    """Compiled programs the demo's settings need at one row shape: distinct signatures of what they pass."""
    import jax

    from sparsemem.evaluation import settings as settings_lib

    keys = set()
    for setting in settings_lib.resolve(config.train.variants).values():
        masks = koff_setting["masks"] if setting.mask else None
        memory = settings_lib.memory_parts(koff_setting["memory"], setting.parts) if setting.memory else None
        placed = scorer.setting(masks, memory, koff_setting["lora_scale"])
        leaves, tree = jax.tree.flatten((placed.scales, placed.table))
        keys.add((tree, tuple((x.shape, x.dtype, x.sharding) for x in leaves), placed.lora_scale))
    return len(keys)


def forward_child(config, pages: dict) -> None:
    """The plain LM loss (every slot a target) of one `[eval.batch_size, eval.seq_len]` batch of page tokens."""
    import jax

    from sparsemem.models.loss import token_cross_entropy

    trainer, _ = _trainer(config, len(pages["domains"]), pages["prefill"])
    backbone = trainer.backbone
    b, t = config.eval.batch_size, config.eval.seq_len
    tokens = np.concatenate([ids for domain in pages["pages"] for ids in domain])
    tokens = np.resize(tokens, b * (t + 1)).reshape(b, t + 1)

    @jax.jit
    def lm_loss(params, tokens):
        model = backbone.decoder(params)
        hidden, _ = model(tokens[:, :-1])
        return token_cross_entropy(model, hidden, tokens[:, 1:], chunk_size=trainer.kcfg.loss_chunk).mean()

    with backbone.context():
        placed = jax.device_put(tokens, backbone.replicated)
        info: dict = {}
        workers.serve(_timing_first_call(lambda: float(lm_loss(backbone.params, placed)), info), info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, help="test pages per language (default: the demo's eval.documents)")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per variant (interleaved)")
    parser.add_argument("--against", help="also time the evaluation as implemented at this git revision")
    parser.add_argument("--rows", help="only print the rows for these comma-separated counts of pages per language")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--pages", help=argparse.SUPPRESS)
    parser.add_argument("--count-programs", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = demo_config(args.documents)
    if args.child:
        pages = json.loads(pathlib.Path(args.pages).read_text())
        return (forward_child(config, pages) if args.child == "forward" else
                evaluation_child(config, pages, args.count_programs))

    if args.rows:
        return rows_table(config, [int(n) for n in args.rows.split(",")])

    from sparsemem.checkpoints.hf import read_config
    from sparsemem.evaluation.settings import resolve
    from sparsemem.scale.flops import forward_flops

    peak, peak_source = hardware.peak_flops("float32")
    folder = tempfile.mkdtemp(prefix="sparsemem-evaluate-")
    path = pathlib.Path(folder) / "pages.json"
    write_pages(config, path)
    common = ["--documents", str(config.eval.documents), "--pages", str(path)]
    variants = [("forward-only LM loss", ["--child", "forward"], None),
                ("evaluation, one setting", ["--child", "evaluate", "--count-programs"], None)]
    if args.against:
        variants.append((f"evaluation @{args.against}", ["--child", "evaluate"], workers.package_at(args.against)))
    procs = [workers.Worker(__file__, argv + common, package) for _, argv, package in variants]
    times = [float(np.median(t)) for t in workers.interleaved(procs, args.rounds)]
    for p in procs:
        p.close()

    e = config.eval
    b, t = e.batch_size, e.seq_len
    forward = b * t / times[0]  # slots (= targets) per second
    gflops = forward_flops(read_config(_tokenizer_args(config)[0]), b, t, logits=True) / times[0] / 1e9
    settings = len(resolve(config.train.variants))
    print(f"Demo evaluation shape: {config.eval.documents} test pages per language, rows of {t} targets, batch {b}; "
          f"median of {args.rounds} interleaved rounds, one process per variant; load "
          f"{' '.join(f'{x:.1f}' for x in hardware.load_average())}; peak {peak / 1e9:.0f} GFLOP/s ({peak_source})")
    print(f"forward-only LM loss [{b}, {t}]: {times[0]:.2f} s, {forward:.0f} tokens/s, {gflops:.1f} GFLOP/s "
          f"({100 * gflops * 1e9 / peak:.0f}% of peak), compile {procs[0].info['compile_seconds']:.1f} s")
    print("| evaluation | s/setting | targets | targets/s | vs forward | slots/s vs forward | padding | context "
          "| host | compile | programs | compile share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, _, _), seconds, proc in list(zip(variants, times, procs))[1:]:
        info = proc.info
        compile_s = info["compile_seconds"]
        programs = info["programs"]
        share = (f"{100 * programs * compile_s / (programs * compile_s + settings * seconds):.1f}%"
                 if programs else "-")
        print(f"| {name} | {seconds:.1f} | {info['targets']} | {info['targets'] / seconds:.0f} | "
              f"{info['targets'] / seconds / forward:.2f} | {info['slots'] / seconds / forward:.2f} | "
              f"{100 * info['padding']:.1f}% | {100 * info['context']:.1f}% | "
              f"{100 * info['host_seconds'] / seconds:.1f}% "
              f"| {compile_s:.1f} s | {programs or '-'} | {share} |")
    print(f"vs forward = targets/s over the forward's tokens/s; slots/s vs forward: the same per row slot (what the "
          f"evaluation's program costs beside the plain forward); padding, context: shares of the row slots that "
          f"score nothing; host: placing the batches and accumulating the losses, as a share of the evaluation's "
          f"time; compile share: programs x compile over that plus the demo's {settings} settings' evaluations")


if __name__ == "__main__":
    main()
