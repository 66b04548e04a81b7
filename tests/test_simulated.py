"""The simulated labelers' taste cannot be won by a trick: no single reply given to every
held-out question earns what a model that is sometimes on topic earns (simulated.py's docstring)."""

from collections import Counter
from functools import lru_cache

import pytest

from shoggoth.data.conversations import chatterbot_conversations
from shoggoth.data.prompts import builtin_prompts, prompt_text
from shoggoth.evaluation import simulated as L

# What the demo's PPO said to every question under the taste before this one (issue: the smiley face).
COLLAPSED = ["I am doing well.", "I am well.", "I am not sure.", "What?", "I do you."]


@lru_cache(maxsize=1)
def questions():
    return [(prompt_text(r), r["references"]) for r in builtin_prompts("heldout")]


@lru_cache(maxsize=1)
def candidates():
    """Every text of the corpus (each answer and question, held-out references included), generic
    and collapsed replies, and kitchen sinks of the commonest content words of the references."""
    texts = {m["content"] for split in ("train", "heldout") for conv in chatterbot_conversations(split)
             for m in conv}
    common = [w for w, _ in Counter(w for _, refs in questions() for r in refs for w in set(L.content_words(r)))
              .most_common(12)]
    sinks = {f"I like {', '.join(common[:k])}." for k in range(1, 13)} | {" ".join(common[:k]) for k in (3, 6, 12)}
    return sorted(texts | set(L.GENERIC) | set(COLLAPSED) | sinks)


def mean(score):
    qs = questions()
    return sum(score(q, refs, i) for i, (q, refs) in enumerate(qs)) / len(qs)


def sometimes_on_topic(score, start, offset):
    """A model on topic one time in twenty (the question's own first reference) that otherwise
    gives another question's (fluent, human-written) reference."""
    qs = questions()
    return mean(lambda q, refs, i: score(q, refs[0] if (i + start) % 20 == 0 else qs[(i + offset) % len(qs)][1][0],
                                         refs))


@pytest.mark.slow
@pytest.mark.parametrize("persona", sorted(L.PERSONAS))
def test_no_single_reply_earns_what_a_model_sometimes_on_topic_earns(persona):
    gold = lambda q, c, refs: L.gold_score(q, c, refs, persona)  # noqa: E731
    const, reply = L.best_constant(questions(), candidates(), persona)
    m20 = min(sometimes_on_topic(gold, start, offset) for start in (0, 5, 10, 15) for offset in (3, 7, 29))
    refs = mean(lambda q, refs, i: gold(q, refs[0], refs))
    echo = mean(lambda q, refs, i: gold(q, q, refs))  # each question answered with itself
    # measured (pure Python, the same on every CPU): best single reply 0.238-0.284 against 0.241-0.291
    # for the model on topic one time in twenty (the smallest margin 0.003, friendly); the echo of
    # each question 0.214-0.259 (it earned 0.42-0.49 when the question's own words counted); references 0.79-0.96
    assert const < m20, (persona, reply, const, m20)
    assert const < 0.35 * refs, (persona, reply, const, refs)
    assert echo < m20 - 0.01, (persona, echo, m20)
    for c in COLLAPSED + ["Yes."]:  # what won the old taste is far from the best now
        assert mean(lambda q, refs, i: gold(q, c, refs)) < m20 - 0.01, c


@pytest.mark.slow
@pytest.mark.parametrize("persona", sorted(L.PERSONAS))
def test_each_labelers_own_noisy_scores_hold_the_same(persona):
    """Each simulated labeler (their jittered weights and noise): the single replies that win
    the persona's gold score, and echoing each question, below the model that is sometimes on
    topic, in the labeler's own scores."""
    gold = lambda q, c, refs: L.gold_score(q, c, refs, persona)  # noqa: E731
    top = sorted(candidates(), key=lambda c: -mean(lambda q, refs, i: gold(q, c, refs)))[:10]
    for seed in range(3):
        sim = L.SimulatedLabeler(persona, seed=seed)
        own = lambda q, c, refs: sim.scores(q, [c], refs)[0]  # noqa: E731
        best = max(mean(lambda q, refs, i: own(q, c, refs)) for c in top)
        echo = mean(lambda q, refs, i: own(q, q, refs))
        m20 = sum(sometimes_on_topic(own, start, 7) for start in (0, 5, 10, 15)) / 4
        assert best < m20 and echo < m20, (persona, seed, best, echo, m20)


def test_a_reply_on_topic_for_one_question_scores_low_on_another():
    refs = dict(questions())
    answers = {"Are you sapient?": "Probably not, I am not that sophisticated.",
               "When will you die": "Never, I am effectively immortal.",
               "Is it cramped in the computer": "Not at all, there is plenty of RAM and disk space.",
               "can you write bubble sort?": "Here is bubble sort in Python: def bubble_sort(arr): for i in range(len(arr)): "
                                             "for j in range(len(arr) - i - 1): if arr[j] > arr[j + 1]: "
                                             "arr[j], arr[j + 1] = arr[j + 1], arr[j]; return arr"}
    for a, reply in answers.items():
        on = L.gold_score(a, reply, refs[a])
        assert L.relevance(a, reply, refs[a]) > 0.3
        for b in answers:
            if b != a:
                assert L.relevance(b, reply, refs[b]) < 0.05, (a, b)
                assert L.gold_score(b, reply, refs[b]) < on - 0.2, (a, b)


def test_a_reply_that_fits_every_question_alike_earns_no_relevance():
    pool = L.Pool([("What is AI?", ["AI is the study of thinking machines."]),
                   ("What is a cat?", ["A cat is a small animal."]),
                   ("Where is Paris?", ["Paris is in France."])])
    cat = ["A cat is a small animal."]
    assert pool.fit("It is a small animal.", "What is a cat?", cat) > 0.3
    assert pool.others("It is a small animal.", "What is a cat?") == 0.0  # no other answer holds "small"
    assert pool.others("Paris in France, thinking", "What is a cat?") > 0
    # only what a reply adds to the question counts: an echo of it, or of its words, earns nothing
    for echo in ("What is a cat?", "A cat.", "cat"):
        assert pool.fit(echo, "What is a cat?", cat) == 0.0, echo
    assert L.relevance("Are you sapient?", "Are you sapient?", ["In all probability, I am not."]) == 0.0
    # on topic: a content word of the question or of a reference; function words do not count
    assert L.on_topic("What is a cat?", "A cat purrs.", []) and not L.on_topic("What is a cat?", "It is what it is.", [])
