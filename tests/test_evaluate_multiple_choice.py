"""Multiple-choice questions: construction, row layout, scoring."""

import numpy as np
import pytest

from sparsemem.evaluation import multiple_choice as mc


def _paragraphs(domain_offset, lengths):
    return [[2] + [domain_offset + 100 * p + i for i in range(n)] for p, n in enumerate(lengths)]


def test_questions_have_one_true_continuation_and_are_aligned_across_domains():
    lengths = [10, 3, 12, 15, 9, 20, 11]  # paragraph 1 and 4 are too short for 4 + 4 tokens
    ids = [_paragraphs(0, lengths), _paragraphs(10_000, lengths)]
    questions = mc.build_questions(ids, num_questions=3, prompt_tokens=4, continuation_tokens=4, aligned=True)
    assert len(questions) == 6
    for q in questions:
        paragraph = (q.prompt[1] - 10_000 * q.domain) // 100
        assert lengths[paragraph] >= 8
        assert q.prompt == tuple(ids[q.domain][paragraph][:5])
        assert q.choices[q.answer] == tuple(ids[q.domain][paragraph][5:9])
        assert len(set(q.choices)) == 4 and all(len(c) == 4 for c in q.choices)
    first, second = questions[:3], questions[3:]
    assert [q.answer for q in first] == [q.answer for q in second]
    assert [(q.prompt[1] % 10_000) for q in first] == [(q.prompt[1] % 10_000) for q in second]


def test_rows_put_the_loss_on_the_choice_tokens_only():
    q = mc.Question(domain=1, prompt=(2, 5, 6), choices=((7, 8), (9, 10), (11, 12), (13, 14)), answer=2)
    (batch,) = mc.question_batches([q], batch_size=4, pad_id=0)
    np.testing.assert_array_equal(batch["inputs"][2], [2, 5, 6, 11])
    np.testing.assert_array_equal(batch["targets"][2], [5, 6, 11, 12])
    np.testing.assert_array_equal(batch["loss_mask"][2], [0, 0, 1, 1])
    np.testing.assert_array_equal(batch["domain"], [1, 1, 1, 1])


class _FakeScorer:
    """Loss = sum of target ids under the mask: the choice with the smallest ids wins."""

    def row_losses(self, batch, **_):
        return (batch["targets"] * batch["loss_mask"]).sum(1), batch["loss_mask"].sum(1)


def test_accuracy_per_domain():
    right = mc.Question(0, (2, 5), ((1, 1), (9, 9), (8, 8), (7, 7)), answer=0)
    wrong = mc.Question(0, (2, 5), ((1, 1), (9, 9), (8, 8), (7, 7)), answer=3)
    other = mc.Question(1, (2, 5), ((9, 9), (8, 8), (1, 1), (7, 7)), answer=2)
    acc = mc.accuracy(_FakeScorer(), [right, wrong, other], 3, batch_size=3, pad_id=0)
    np.testing.assert_allclose(acc[:2], [0.5, 1.0])
    assert np.isnan(acc[2])


def test_too_few_long_paragraphs_is_a_clear_error():
    with pytest.raises(ValueError, match="mc_questions=0"):
        mc.build_questions([_paragraphs(0, [10, 10, 2])], num_questions=2, prompt_tokens=4,
                           continuation_tokens=4, aligned=False)


def test_distractors_never_repeat_the_answer():
    ids = [[[2, 7, 7, 7, 7, 1, 1, 1, 1] for _ in range(6)] + _paragraphs(0, [10, 10, 10, 10])]  # 6 identical
    for q in mc.build_questions(ids, num_questions=10, prompt_tokens=4, continuation_tokens=4, aligned=False):
        assert len(set(q.choices)) == 4


def test_translation_questions_pair_a_source_paragraph_with_its_translation():
    lengths = [10, 3, 12, 15, 9, 20, 11]
    ids = [_paragraphs(0, lengths), _paragraphs(10_000, lengths), _paragraphs(20_000, lengths)]
    questions = mc.build_translation_questions(ids, source=0, num_questions=3, prompt_tokens=5,
                                               continuation_tokens=4, separator=[9, 9])
    assert len(questions) == 6 and {q.domain for q in questions} == {1, 2}
    for q in questions:
        paragraph = q.prompt[1] // 100
        assert q.prompt == tuple(ids[0][paragraph][:6]) + (9, 9)
        assert q.baseline == (2, 9, 9)
        assert q.choices[q.answer] == tuple(ids[q.domain][paragraph][1:5])
        assert len(set(q.choices)) == 4 and all(len(c) == 4 for c in q.choices)


def test_translation_needs_an_aligned_corpus():
    with pytest.raises(ValueError, match="aligned"):
        mc.build_translation_questions([_paragraphs(0, [9] * 5), _paragraphs(0, [9] * 4)], source=0,
                                       num_questions=2, prompt_tokens=4, continuation_tokens=4, separator=[9])


def test_baseline_likelihood_is_subtracted():
    class SourceHelpsNines:
        """Loss = sum of target ids, 3 nats less for a choice of 9s when the source token 5 is in the prompt."""

        def row_losses(self, batch, **_):
            helped = (batch["inputs"] == 5).any(1) & (batch["targets"] == 9).any(1)
            return (batch["targets"] * batch["loss_mask"]).sum(1) - 3.0 * helped, batch["loss_mask"].sum(1)

    choices = ((7, 7), (9, 9), (8, 8), (1, 20))  # with the prompt: 14, 15, 16, 21; gains over (2,): 0, -3, 0, 0
    plain = mc.Question(0, (2, 5), choices, answer=0)
    gain = mc.Question(1, (2, 5), choices, answer=1, baseline=(2,))
    np.testing.assert_allclose(mc.accuracy(SourceHelpsNines(), [plain, gain], 2, batch_size=4, pad_id=0), [1.0, 1.0])


def test_same_page_distractors_are_the_documents_own_later_windows_then_similar_lengths():
    ids = [_paragraphs(0, [30, 9, 9, 9, 9, 40])]  # documents 0 and 5 hold 4 windows of 4 after a 4-token prompt
    questions = mc.build_questions(ids, num_questions=6, prompt_tokens=4, continuation_tokens=4, aligned=False,
                                   distractors="same_page")
    for q in questions:
        document = q.prompt[1] // 100
        windows = {tuple(ids[0][document][5 + 4 * k:9 + 4 * k]) for k in range(4)}
        if len(ids[0][document]) >= 1 + 4 + 16:
            assert set(q.choices) == windows  # every distractor from the same page
        else:
            assert {c[0] // 100 for c in q.choices if c != q.choices[q.answer]} <= {1, 2, 3, 4}  # nearest lengths
    with pytest.raises(ValueError, match="distractors"):
        mc.build_questions(ids, num_questions=1, prompt_tokens=4, continuation_tokens=4, aligned=False,
                           distractors="hard")


def test_same_page_translation_distractors_come_from_the_same_page_first():
    lengths = [10, 12, 15, 9, 20, 11, 14, 13]
    ids = [_paragraphs(0, lengths), _paragraphs(10_000, lengths)]
    pages = ["a", "a", "a", "a", "b", "b", "b", "b"]
    questions = mc.build_translation_questions(ids, source=0, num_questions=8, prompt_tokens=5, continuation_tokens=4,
                                               separator=[9], distractors="same_page", pages=pages)
    assert len(questions) == 8
    for q in questions:
        page = pages[q.prompt[1] // 100]
        assert {pages[(c[0] - 10_000) // 100] for c in q.choices} == {page}
