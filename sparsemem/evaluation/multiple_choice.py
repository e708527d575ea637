"""Multiple choice from held-out paragraphs: 4 candidates, the most likely one is the answer.

Two tasks, every candidate `continuation_tokens` long:
- *continuation*: the prompt is a document's first `prompt_tokens` tokens (after BOS);
  the candidates are the next tokens of that document and 3 distractors of the same
  domain; the summed log-likelihood decides. For an aligned corpus, question j uses the
  same paragraph in every domain.
- *translation* (aligned corpora): the prompt is a source-language paragraph (first
  `prompt_tokens` tokens) and a separator; the candidates are the first tokens of its
  translation and of 3 other paragraphs in the target language (the question's
  domain). Candidates differ in how likely they are a priori, so the score is the
  log-likelihood gain over the separator alone (`baseline`): log p(c | source) - log p(c).
Distractors are candidates that differ from the answer. `"random"` draws them from other
documents; `"same_page"` (harder: same topic and style) takes them from the same page
first, then from the documents nearest in length.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from sparsemem.evaluation.scoring import Scorer

NUM_CHOICES = 4
TASKS = ("continuation", "translation")
DISTRACTORS = ("random", "same_page")


@dataclasses.dataclass(frozen=True)
class Question:
    domain: int
    prompt: tuple[int, ...]
    choices: tuple[tuple[int, ...], ...]
    answer: int
    baseline: tuple[int, ...] | None = None  # a prompt whose choice likelihoods are subtracted (None: none)


def _choices(rng: np.random.Generator, answer: tuple, candidates) -> tuple[tuple, int] | None:
    """`(choices, answer index)`: the answer and the first 3 distinct `candidates` unlike it, shuffled; None if too few."""
    picks, seen = [answer], {answer}
    for candidate in candidates:
        if len(picks) == NUM_CHOICES:
            break
        if candidate not in seen:
            picks.append(candidate)
            seen.add(candidate)
    if len(picks) < NUM_CHOICES:
        return None
    order = rng.permutation(NUM_CHOICES)
    return tuple(picks[i] for i in order), int(np.flatnonzero(order == 0)[0])


def _by_similarity(others: list[int], lengths: Sequence[int], target: int, groups=None) -> list[int]:
    """`others` with the same group (page) as `target` first, then nearest in length; ties keep their order."""
    same = (lambda o: groups[o] != groups[target]) if groups is not None else (lambda o: False)  # noqa: E731
    return sorted(others, key=lambda o: (same(o), abs(lengths[o] - lengths[target])))


def _too_few(domain: int, count: int, need: int) -> ValueError:
    return ValueError(f"domain {domain} has {count} usable held-out documents of >= {need} tokens; "
                      f"multiple choice needs >= {NUM_CHOICES} with different candidates: lower "
                      "eval.mc_prompt_tokens/mc_continuation_tokens, raise eval.paragraphs, or set eval.mc_questions=0")


def _check_distractors(distractors: str) -> None:
    if distractors not in DISTRACTORS:
        raise ValueError(f"distractors={distractors!r}: choose from {DISTRACTORS}")


def build_questions(token_ids: Sequence[Sequence[Sequence[int]]], *, num_questions: int, prompt_tokens: int,
                    continuation_tokens: int, aligned: bool, seed: int = 0, distractors: str = "random"
                    ) -> list[Question]:
    """Up to `num_questions` continuation questions per domain from `token_ids[domain][document]` (BOS included).

    Distractors are windows of `continuation_tokens` tokens. `"random"`: the same window
    of 3 other documents, drawn at random. `"same_page"`: the document's own later
    windows first (same page, same topic and style), then the same window of the
    documents nearest in length.
    """
    _check_distractors(distractors)
    need = 1 + prompt_tokens + continuation_tokens
    eligible = [{i for i, ids in enumerate(documents) if len(ids) >= need} for documents in token_ids]
    if aligned:
        common = sorted(set.intersection(*eligible))
        eligible = [common] * len(token_ids)
    questions = []
    for domain, (documents, pool) in enumerate(zip(token_ids, eligible)):
        pool = sorted(pool)
        lengths = [len(ids) for ids in documents]

        def window(p, k=0, documents=documents):
            return tuple(documents[p][need - continuation_tokens + k * continuation_tokens:need + k * continuation_tokens])

        if len({window(p) for p in pool}) < NUM_CHOICES:
            raise _too_few(domain, len(pool), need)
        rng = np.random.default_rng(seed)  # same draws in every domain: aligned questions stay aligned
        for q in rng.permutation(len(pool))[:num_questions]:
            p = pool[q]
            others = [pool[i] for i in rng.permutation(len(pool)) if pool[i] != p]
            candidates = [window(o) for o in others]
            if distractors == "same_page":
                own = [window(p, k) for k in range(1, NUM_CHOICES) if lengths[p] >= need + k * continuation_tokens]
                candidates = own + [window(o) for o in _by_similarity(others, lengths, p)]
            picked = _choices(rng, window(p), candidates)
            if picked is not None:
                questions.append(Question(domain, tuple(documents[p][:1 + prompt_tokens]), *picked))
    return questions


def build_translation_questions(token_ids: Sequence[Sequence[Sequence[int]]], *, source: int, num_questions: int,
                                prompt_tokens: int, continuation_tokens: int, separator: Sequence[int],
                                seed: int = 0, distractors: str = "random",
                                pages: Sequence[str] | None = None) -> list[Question]:
    """Up to `num_questions` questions per target domain: translate paragraph p of `source` into that domain.

    `token_ids[domain][p]` (BOS included) must be aligned: paragraph p translates
    paragraph p of every other domain. Sources are cut to `prompt_tokens` tokens.
    Distractors: `"random"` paragraphs, or `"same_page"`: paragraphs of the same page
    (`pages[p]`, shared by every domain) first, then the nearest in length.
    """
    _check_distractors(distractors)
    if len({len(paragraphs) for paragraphs in token_ids}) != 1:
        raise ValueError("translation questions need an aligned corpus (the same paragraphs in every domain)")
    sep = tuple(separator)
    questions = []
    for domain, paragraphs in enumerate(token_ids):
        if domain == source:
            continue
        lengths = [len(ids) for ids in paragraphs]
        pool = [p for p, ids in enumerate(paragraphs) if len(ids) > continuation_tokens and len(token_ids[source][p]) > 1]
        candidate = lambda p, paragraphs=paragraphs: tuple(paragraphs[p][1:1 + continuation_tokens])  # noqa: E731
        if len({candidate(p) for p in pool}) < NUM_CHOICES:
            raise _too_few(domain, len(pool), 1 + continuation_tokens)
        rng = np.random.default_rng(seed)
        for q in rng.permutation(len(pool))[:num_questions]:
            p = pool[q]
            others = [pool[i] for i in rng.permutation(len(pool)) if pool[i] != p]
            if distractors == "same_page":
                others = _by_similarity(others, lengths, p, pages)
            picked = _choices(rng, candidate(p), [candidate(o) for o in others])
            if picked is None:
                continue
            prompt = tuple(token_ids[source][p][:1 + prompt_tokens]) + sep
            questions.append(Question(domain, prompt, *picked, baseline=prompt[:1] + sep))
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


def answers_correct(scorer: Scorer, questions: Sequence[Question], *, batch_size: int, pad_id: int,
                    first_position: int = 0, **kwargs) -> np.ndarray:
    """Whether each question is answered correctly `[Q]`; `kwargs` go to `Scorer.row_losses`.

    A question's choice with the lowest loss wins, where the loss of a question with
    a `baseline` prompt is its loss after the prompt minus its loss after the baseline.
    """

    def choice_losses(questions):
        losses = []
        for batch in question_batches(questions, batch_size=batch_size, pad_id=pad_id, first_position=first_position):
            losses.append(scorer.row_losses(batch, **kwargs)[0])
        return np.concatenate(losses)[:len(questions) * NUM_CHOICES].reshape(len(questions), NUM_CHOICES)

    per_choice = choice_losses(questions)
    with_baseline = np.array([q.baseline is not None for q in questions])
    if with_baseline.any():
        baselines = [dataclasses.replace(q, prompt=q.baseline) for q in questions if q.baseline is not None]
        per_choice[with_baseline] -= choice_losses(baselines)
    return np.argmin(per_choice, axis=1) == np.array([q.answer for q in questions])


def per_domain_accuracy(correct: np.ndarray, domains: np.ndarray, num_domains: int) -> np.ndarray:
    """Accuracy per domain `[D]` (NaN for a domain without questions)."""
    with np.errstate(invalid="ignore"):
        return np.array([np.mean(correct[domains == d]) if np.any(domains == d) else np.nan
                         for d in range(num_domains)])


def accuracy(scorer: Scorer, questions: Sequence[Question], num_domains: int, **kwargs) -> np.ndarray:
    """Accuracy per domain `[D]` (NaN for a domain without questions); `kwargs` as for `answers_correct`."""
    correct = answers_correct(scorer, questions, **kwargs)
    return per_domain_accuracy(correct, np.array([q.domain for q in questions]), num_domains)
