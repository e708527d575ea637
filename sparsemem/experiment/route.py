"""`sparsemem route`: how well unlabelled prompts find their memory, on held-out text of every domain of a run.

For each domain (the run's and those added by `sparsemem extend`) it takes
`documents` held-out token sequences of `max(lengths) + continuation` tokens
(consecutive held-out paragraphs from an evenly spread start) and scores, with one
pass of the exported backbone under each domain's memory and one truncated pass for
the routing features (both causal, so every prompt length is a prefix of the same
passes):

* top-1 accuracy of the centroid router and of the likelihood router for prompts of
  each length, and their confusion matrices;
* perplexity of the `continuation` tokens after a prompt of `ppl_prompt` tokens under
  the routed memory, the true domain's (oracle) memory, and no memory;
* the memory-swap matrix: perplexity of each domain's sequences under every memory;
* routing cost: wall time of routing a batch of prompts vs generating 64 tokens for it.

Results go to `<run>/route.json` and are printed as markdown tables.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from sparsemem.experiment import setup
from sparsemem.experiment.domains import all_sources
from sparsemem.experiment.report import write_report
from sparsemem.experiment.rundir import RunDir, Timer
from sparsemem.serve import routing
from sparsemem.serve.deploy import Deployment
from sparsemem.serve.generate import SamplingConfig

log = logging.getLogger(__name__)

LENGTHS = (8, 16, 32, 64)
SEPARATOR = "\n\n"  # between consecutive held-out paragraphs of one sequence
GENERATED = 64  # routing cost is measured against generating this many tokens


def held_out_sequences(source, tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` sequences of `length` tokens (BOS first) of consecutive paragraphs from starts spread over `source`.

    A sequence that reaches the end of the split continues from its beginning; with less
    than `length` tokens of text in all there are none.
    """
    n = len(source.records)
    out = []
    for start in np.linspace(0, n, count, endpoint=False).astype(int):
        ids: list[int] = []
        for i in range(int(start), int(start) + n):
            ids += tokenizer.encode(source.text(source.records[i % n]) + SEPARATOR, add_bos=not ids)
            if len(ids) >= length:
                out.append(ids[:length])
                break
    return out


def _timed(fn, repeats: int = 3) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def evaluate_routing(deployment: Deployment, sequences: dict[str, list[list[int]]], lengths=LENGTHS,
                     ppl_prompt: int = 32, batch_size: int = 8) -> dict:
    """Routing accuracy, confusion, routed/oracle perplexity, swap matrix and cost; see the module docstring."""
    model, bank, router = deployment.backbone.model, deployment.bank, deployment.router
    if router is None:
        deployment.route([[model.cfg.bos_id]])  # raises the RoutingError that says how to get centroids
    names = list(bank.domains)
    unknown = sorted(set(sequences) - set(names))
    if unknown:
        raise ValueError(f"no exported module for domain(s) {unknown}; run `sparsemem export --run ...` again")
    bos = model.cfg.bos_id
    D = len(names)
    counts = {kind: {n: np.zeros((D, D), int) for n in lengths} for kind in ("centroid", "likelihood")}
    swap_nll, swap_tokens = np.zeros((D, D)), np.zeros(D)
    ppl = {kind: np.zeros(D) for kind in ("routed", "likelihood_routed", "oracle", "no_memory")}
    ppl_tokens = np.zeros(D)
    start = time.perf_counter()
    for done, (domain, seqs) in enumerate(sequences.items()):
        log.info("[route] %s: %d sequences under %d memories (%d/%d domains, %.0f s)", domain, len(seqs), D, done + 1,
                 len(sequences), time.perf_counter() - start)
        truth = names.index(domain)
        for i in range(0, len(seqs), batch_size):
            batch = seqs[i: i + batch_size]
            tokens, segments = routing.pad_right(batch, model.cfg.pad_id)
            features = routing.token_features(model, tokens, segments, router.layer)
            nll = routing.nll_under_each_domain(model, bank, tokens, segments)  # [D, B, T-1]
            bare = routing.token_nll(model, tokens, segments, None)
            chosen = {}
            for n in lengths:
                lens = np.full(len(batch), n)
                chosen["centroid", n] = router.scores(
                    routing.prefix_means(features, tokens, segments, lens, bos)).argmax(1)
                chosen["likelihood", n] = nll[:, :, : n - 1].sum(-1).argmin(0)
                for kind in counts:
                    np.add.at(counts[kind][n], (truth, chosen[kind, n]), 1)
            swap_nll[truth] += nll.sum((1, 2))
            swap_tokens[truth] += (segments[:, 1:] > 0).sum()
            rest = slice(ppl_prompt - 1, None)  # targets after the first `ppl_prompt` tokens
            rows = np.arange(len(batch))
            ppl["oracle"][truth] += nll[truth, :, rest].sum()
            ppl["routed"][truth] += nll[chosen["centroid", ppl_prompt], rows, rest].sum()
            ppl["likelihood_routed"][truth] += nll[chosen["likelihood", ppl_prompt], rows, rest].sum()
            ppl["no_memory"][truth] += bare[:, rest].sum()
            ppl_tokens[truth] += (segments[:, ppl_prompt:] > 0).sum()
    present = [names.index(d) for d in sequences]
    prompts = [s[:ppl_prompt] for seqs in sequences.values() for s in seqs]
    accuracy = {kind: {str(n): {names[t]: float(c[t, t] / c[t].sum()) for t in present} | {
        "mean": float(np.mean([c[t, t] / c[t].sum() for t in present]))} for n, c in by_n.items()}
        for kind, by_n in counts.items()}
    perplexity = {kind: {names[t]: float(np.exp(v[t] / ppl_tokens[t])) for t in present} for kind, v in ppl.items()}
    for kind in perplexity:
        perplexity[kind]["geomean"] = float(np.exp(np.mean([np.log(perplexity[kind][names[t]]) for t in present])))
    swap = np.exp(swap_nll[present] / swap_tokens[present, None])
    return {"domains": [names[t] for t in present], "memories": names, "layer": router.layer,
            "lengths": list(lengths), "ppl_prompt": ppl_prompt,
            "sequences": {d: len(s) for d, s in sequences.items()},
            "accuracy": accuracy,
            "confusion": {kind: {str(n): c[present].tolist() for n, c in by_n.items()}
                          for kind, by_n in counts.items()},
            "perplexity": perplexity, "swap": swap.tolist(),
            "cost": routing_cost(deployment, prompts[:batch_size])}


def routing_cost(deployment: Deployment, prompts: list[list[int]]) -> dict:
    """Seconds to route `prompts` (each router) and to generate `GENERATED` tokens for them with memory."""
    routed = deployment.route(prompts)
    likelihood = routing.LikelihoodRouter(deployment.bank)
    sampling = SamplingConfig(max_new_tokens=GENERATED)
    centroid_s = _timed(lambda: deployment.route(prompts))
    likelihood_s = _timed(lambda: likelihood.route(deployment.backbone.model, prompts))
    generate_s = _timed(lambda: deployment.generate_ids(prompts, routed, sampling), repeats=1)
    return {"batch": len(prompts), "prompt_tokens": len(prompts[0]), "generated_tokens": GENERATED,
            "centroid_s": centroid_s, "likelihood_s": likelihood_s, "generate_s": generate_s,
            "centroid_share": centroid_s / generate_s, "likelihood_share": likelihood_s / generate_s}


def route_run(run_dir: str, variant: str = "koff", documents: int = 16, lengths=LENGTHS, ppl_prompt: int = 32,
              continuation: int = 64, batch_size: int = 8) -> dict:
    """Evaluate routing on every domain of a run's export; writes and returns `route.json`."""
    from sparsemem.serve.commands import export_folder  # noqa: PLC0415

    run = RunDir(run_dir)
    config = run.config()
    if ppl_prompt not in lengths:
        raise ValueError(f"the perplexity prompt length {ppl_prompt} must be one of the prompt lengths {lengths}")
    if config.mesh.distributed:  # as the run: every process routes (on its own devices), process 0 writes
        setup.start_distributed()
    with setup.open_run(run, config):  # reads the export once process 0 holds the lock
        deployment = Deployment.load(export_folder(run_dir, variant))
        _, tokenizer = setup.load_model(config, None) if deployment.tokenizer is None else (None, deployment.tokenizer)
        length = max(lengths) + continuation
        with Timer(run, "route"):
            sequences = {s.name: held_out_sequences(s, tokenizer, documents, length)
                         for s in all_sources(run, config, config.eval.split)}
            empty = sorted(name for name, seqs in sequences.items() if not seqs)
            if empty:
                raise ValueError(f"held-out text of {empty} is shorter than {length} tokens; lower --lengths or "
                                 "--continuation")
            result = evaluate_routing(deployment, sequences, lengths, ppl_prompt, batch_size)
        run.write_json("route.json", result)
        if run.primary:
            write_report(run)
    return result
