"""Multiple choice from held-out paragraphs: pick a paragraph's true continuation among 4.

A question takes one paragraph's first `prompt_tokens` tokens (after BOS) as the
prompt; the candidates are the next `continuation_tokens` tokens of that paragraph
and of 3 other paragraphs of the same domain, so every candidate has the same
length and the summed log-likelihood decides. For an aligned corpus, question j
uses the same paragraph (and distractors) in every domain.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from sparsemem.evaluation.scoring import Scorer

NUM_CHOICES = 4


@dataclasses.dataclass(frozen=True)
class Question:
    domain: int
    prompt: tuple[int, ...]
    choices: tuple[tuple[int, ...], ...]
    answer: int


def build_questions(token_ids: Sequence[Sequence[Sequence[int]]], *, num_questions: int, prompt_tokens: int,
                    continuation_tokens: int, aligned: bool, seed: int = 0) -> list[Question]:
    """Up to `num_questions` questions per domain from `token_ids[domain][paragraph]` (BOS included)."""
    need = 1 + prompt_tokens + continuation_tokens
    eligible = [{i for i, ids in enumerate(paragraphs) if len(ids) >= need} for paragraphs in token_ids]
    if aligned:
        common = sorted(set.intersection(*eligible))
        eligible = [common] * len(token_ids)
    questions = []
    for domain, (paragraphs, pool) in enumerate(zip(token_ids, eligible)):
        pool = sorted(pool)
        if len(pool) < NUM_CHOICES:
            raise ValueError(f"domain {domain} has {len(pool)} held-out paragraphs of >= {need} tokens; "
                             f"multiple choice needs >= {NUM_CHOICES}: lower eval.mc_prompt_tokens/"
                             "mc_continuation_tokens, raise eval.paragraphs, or set eval.mc_questions=0")
        rng = np.random.default_rng(seed)  # same draws in every domain: aligned questions stay aligned
        for q in rng.permutation(len(pool))[:num_questions]:
            others = rng.choice([i for i in range(len(pool)) if i != q], NUM_CHOICES - 1, replace=False)
            order = rng.permutation(NUM_CHOICES)
            picks = [pool[q]] + [pool[i] for i in others]
            cont = [tuple(paragraphs[p][1 + prompt_tokens:need]) for p in picks]
            questions.append(Question(domain, tuple(paragraphs[pool[q]][:1 + prompt_tokens]),
                                      tuple(cont[i] for i in order), int(np.flatnonzero(order == 0)[0])))
    return questions


def question_batches(questions: Sequence[Question], *, batch_size: int, pad_id: int,
                     first_position: int = 0) -> list[dict[str, np.ndarray]]:
    """Rows `prompt + choice` (one per choice, loss on the choice's tokens), in batches of `batch_size` rows.

    Positions start at `first_position` (the number of memory slots: text follows the memory).
    """
    rows = [(q.domain, q.prompt + c, len(q.prompt)) for q in questions for c in q.choices]
    length = max(len(tokens) for _, tokens, _ in rows) - 1
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        b = batch_size
        batch = {"inputs": np.full((b, length), pad_id, np.int32), "targets": np.full((b, length), pad_id, np.int32),
                 "loss_mask": np.zeros((b, length), np.float32), "segment_ids": np.zeros((b, length), np.int32),
                 "positions": np.zeros((b, length), np.int32), "domain": np.zeros((b,), np.int32)}
        for r, (domain, tokens, prompt_len) in enumerate(chunk):
            n = len(tokens) - 1
            batch["inputs"][r, :n], batch["targets"][r, :n] = tokens[:-1], tokens[1:]
            batch["loss_mask"][r, prompt_len - 1:n] = 1.0
            batch["segment_ids"][r, :n] = 1
            batch["positions"][r, :n] = first_position + np.arange(n)
            batch["domain"][r] = domain
        batches.append(batch)
    return batches


def accuracy(scorer: Scorer, questions: Sequence[Question], num_domains: int, *, batch_size: int, pad_id: int,
             first_position: int = 0, **kwargs) -> np.ndarray:
    """Accuracy per domain `[D]` (NaN for a domain without questions); `kwargs` go to `Scorer.row_losses`."""
    losses = []
    for batch in question_batches(questions, batch_size=batch_size, pad_id=pad_id, first_position=first_position):
        loss, _ = scorer.row_losses(batch, **kwargs)
        losses.append(loss)
    per_choice = np.concatenate(losses)[:len(questions) * NUM_CHOICES].reshape(len(questions), NUM_CHOICES)
    correct = np.argmin(per_choice, axis=1) == np.array([q.answer for q in questions])
    domains = np.array([q.domain for q in questions])
    with np.errstate(invalid="ignore"):
        return np.array([correct[domains == d].mean() if np.any(domains == d) else np.nan
                         for d in range(num_domains)])
