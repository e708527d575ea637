"""The full evaluation of a run: perplexity per setting, memory-swap matrix, multiple choice."""

from __future__ import annotations

import logging
import time
from typing import Mapping, Sequence

import numpy as np

from sparsemem.evaluation import multiple_choice
from sparsemem.evaluation.scoring import Scorer, domain_losses
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


def evaluate(scorer: Scorer, settings: Mapping[str, Setting], *, domains: Sequence[str], batches: list,
             masks: Mapping[str, dict], tables: Mapping[str, dict], lora_scales: Mapping[str, float],
             questions: Mapping[str, Sequence[multiple_choice.Question]], mc_settings: Sequence[str], batch_size: int,
             pad_id: int, first_position: int = 0) -> dict:
    """Everything the report shows about quality, as a JSON-ready dict (perplexities in exp(nats/token)).

    `questions` maps a multiple-choice task (`multiple_choice.TASKS`) to its questions.
    """
    D = len(domains)
    out: dict = {"domains": list(domains), "settings": {n: s.label for n, s in settings.items()},
                 "loss": {}, "perplexity": {}, "tokens": {}}
    def record(name, loss, tokens, seconds):
        mean = loss / tokens
        out["loss"][name] = {**_per_domain(mean, domains), "mean": float(np.mean(mean))}
        out["perplexity"][name] = {**_per_domain(np.exp(mean), domains), "mean": float(np.exp(np.mean(mean)))}
        out["tokens"] = _per_domain(tokens, domains)
        log.info("eval %-16s ppl %s (%.0f s)", name,
                 " ".join(f"{d}={np.exp(m):.2f}" for d, m in zip(domains, mean)), seconds)

    for name, setting in settings.items():
        if name != "koff":  # KOFF is the diagonal of the swap matrix below
            start = time.perf_counter()
            loss, tokens = domain_losses(scorer, batches, D, **_setting_kwargs(setting, masks, tables, lora_scales))
            record(name, loss, tokens, time.perf_counter() - start)

    # Memory swap: row i evaluates every domain's text with domain i's memory.
    kwargs = _setting_kwargs(settings["koff"], masks, tables, lora_scales)
    swap_loss, diag_loss = np.zeros((D, D)), np.zeros(D)
    start = time.perf_counter()
    for i in range(D):
        loss, tokens = domain_losses(scorer, batches, D, memory_index=i, **kwargs)
        swap_loss[i], diag_loss[i] = loss / tokens, loss[i]
    record("koff", diag_loss, tokens, time.perf_counter() - start)
    swap = np.exp(swap_loss)
    out["swap"] = {"rows": "memory of domain i", "columns": "text of domain j", "perplexity": swap.tolist(),
                   "diagonal_wins": int(np.sum(np.argmin(swap, axis=0) == np.arange(D)))}

    out["mc"], out["mc_questions_per_domain"] = {}, {}
    for task, task_questions in questions.items():
        out["mc"][task] = {}
        for name in mc_settings:
            if name not in settings:
                continue
            acc = multiple_choice.accuracy(scorer, task_questions, D, batch_size=batch_size, pad_id=pad_id,
                                           first_position=first_position,
                                           **_setting_kwargs(settings[name], masks, tables, lora_scales))
            out["mc"][task][name] = {**_per_domain(acc, domains), "mean": float(np.nanmean(acc))}
            log.info("eval %s multiple choice %-16s accuracy %s", task, name,
                     " ".join(f"{d}={a:.2f}" for d, a in zip(domains, acc)))
        out["mc_questions_per_domain"][task] = max(
            int(np.sum([q.domain == d for q in task_questions])) for d in range(D))
    return out
