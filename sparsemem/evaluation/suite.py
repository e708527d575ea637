"""The full evaluation of a run: per-document losses per setting, memory-swap matrix, multiple choice."""

from __future__ import annotations

import logging
import time
from typing import Mapping, Sequence

import numpy as np

from sparsemem.evaluation import multiple_choice
from sparsemem.evaluation.documents import DocumentBatches, bucket_edges
from sparsemem.evaluation.scoring import Scorer, document_losses
from sparsemem.evaluation.settings import Setting, memory_parts

log = logging.getLogger(__name__)


def _setting_kwargs(setting: Setting, masks: Mapping[str, dict], tables: Mapping[str, dict],
                    lora_scales: Mapping[str, float]) -> dict:
    kwargs = {"masks": masks[setting.mask] if setting.mask else None}
    if setting.memory:
        kwargs["memory"] = memory_parts(tables[setting.memory], setting.parts)
        kwargs["lora_scale"] = lora_scales[setting.memory]
    return kwargs


def _per_domain(values: np.ndarray, domains: Sequence[str]) -> dict[str, float]:
    return {name: float(v) for name, v in zip(domains, values)}


def evaluate(scorer: Scorer, settings: Mapping[str, Setting], *, domains: Sequence[str], documents: DocumentBatches,
             paragraphs: DocumentBatches, masks: Mapping[str, dict], tables: Mapping[str, dict],
             lora_scales: Mapping[str, float], questions: Mapping[str, Sequence[multiple_choice.Question]],
             mc_settings: Sequence[str], batch_size: int, pad_id: int, first_position: int = 0) -> dict:
    """Everything the report shows about quality, as a JSON-ready dict (perplexities in exp(nats/token)).

    `documents` (whole pages by default) give perplexity per setting, with the per-document
    losses the report's bootstrap intervals resample; `paragraphs` (aligned) give the
    memory-swap matrix; `questions` maps a multiple-choice task to its questions.
    """
    D = len(domains)
    out: dict = {"domains": list(domains), "settings": {n: s.label for n, s in settings.items()},
                 "documents": {"domain": documents.domain.tolist(), "tokens": documents.tokens.tolist()},
                 "loss": {}, "loss_after_first": {}, "perplexity": {}, "document_loss": {}, "position_loss": {},
                 "tokens": _per_domain(np.bincount(documents.domain, documents.tokens, D), domains)}
    tokens = np.bincount(documents.domain, documents.tokens, D)
    for name, setting in settings.items():
        start = time.perf_counter()
        got = document_losses(scorer, documents, **_setting_kwargs(setting, masks, tables, lora_scales))
        mean = np.bincount(documents.domain, got.loss, D) / tokens
        after_first = (np.bincount(documents.domain, got.loss - got.first, D)
                       / np.maximum(tokens - np.bincount(documents.domain, minlength=D), 1))
        out["loss"][name] = {**_per_domain(mean, domains), "mean": float(np.mean(mean))}
        out["loss_after_first"][name] = {**_per_domain(after_first, domains), "mean": float(np.mean(after_first))}
        out["perplexity"][name] = {**_per_domain(np.exp(mean), domains), "mean": float(np.exp(np.mean(mean)))}
        out["document_loss"][name] = {"loss": got.loss.tolist(), "first": got.first.tolist()}
        used = got.count_by_offset > 0
        out["position_loss"][name] = {"offsets": [label for label, u in zip(bucket_edges(len(used)), used) if u],
                                      "loss": (got.by_offset[used] / got.count_by_offset[used]).tolist()}
        log.info("eval %-18s ppl %s (%.0f s)", name, " ".join(f"{d}={np.exp(m):.2f}" for d, m in zip(domains, mean)),
                 time.perf_counter() - start)

    # Memory swap on aligned paragraphs: row i scores every domain's text with domain i's memory.
    kwargs = _setting_kwargs(settings["koff"], masks, tables, lora_scales)
    start = time.perf_counter()
    swap_docs = [document_losses(scorer, paragraphs, memory_index=i, **kwargs).loss for i in range(D)]
    swap_tokens = np.bincount(paragraphs.domain, paragraphs.tokens, D)
    swap = np.exp(np.array([np.bincount(paragraphs.domain, loss, D) / swap_tokens for loss in swap_docs]))
    log.info("eval memory swap (%.0f s)", time.perf_counter() - start)
    out["swap"] = {"rows": "memory of domain i", "columns": "text of domain j", "perplexity": swap.tolist(),
                   "diagonal_wins": int(np.sum(np.argmin(swap, axis=0) == np.arange(D))),
                   "documents": {"domain": paragraphs.domain.tolist(), "tokens": paragraphs.tokens.tolist()},
                   "document_loss": [loss.tolist() for loss in swap_docs]}

    out["mc"], out["mc_correct"], out["mc_domain"], out["mc_questions_per_domain"] = {}, {}, {}, {}
    for task, task_questions in questions.items():
        out["mc"][task], out["mc_correct"][task] = {}, {}
        question_domains = np.array([q.domain for q in task_questions])
        out["mc_domain"][task] = question_domains.tolist()
        for name in mc_settings:
            if name not in settings:
                continue
            correct = multiple_choice.answers_correct(scorer, task_questions, batch_size=batch_size, pad_id=pad_id,
                                                      first_position=first_position,
                                                      **_setting_kwargs(settings[name], masks, tables, lora_scales))
            acc = multiple_choice.per_domain_accuracy(correct, question_domains, D)
            out["mc"][task][name] = {**_per_domain(acc, domains), "mean": float(np.nanmean(acc))}
            out["mc_correct"][task][name] = correct.astype(int).tolist()
            log.info("eval %s multiple choice %-16s accuracy %s", task, name,
                     " ".join(f"{d}={a:.2f}" for d, a in zip(domains, acc)))
        out["mc_questions_per_domain"][task] = int(max(np.bincount(question_domains, minlength=D)))
    return out
