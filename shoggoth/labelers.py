"""Simulated labelers ("personas") that rank completions by a written-down taste.

The taste has four parts, each in [0, 1]:
- relevance: overlap F1 of the content words (function words such as "I",
  "do", "you", "the" left out) with the prompt's reference answers, the best
  match among them, or with the prompt itself when it has none. Function
  words are what every reply shares: counted, "I do you." matched a third of
  "I do not have a body", and a PPO policy that gave that one reply to every
  question scored above its SFT model's on-topic attempts. A reply without
  the question's content words ignores it, and people rank such
  one-size-fits-all replies last however fluent;
- fluency: the share of the completion's words that are English words, i.e.
  words of the built-in corpora (the King James Bible and the English
  chatterbot-corpus, about 15,000 words). People punish gibberish before
  anything else; without this part "Vachorthord young pga, I am accear(peri?"
  was ranked first of four on a lucky "I am", and a small model's completions,
  mostly made-up words, differed only in what no reader could see (measured: a
  reward model reached 0.55-0.62 held-out accuracy on such rankings, a
  bag-of-words baseline 0.62-0.67; with fluency 0.72-0.74);
- friendliness: VADER's compound sentiment of the completion, mapped to [0, 1];
- brevity: 1 / (1 + words / 30), so a 30-word answer scores 0.5.

A persona weighs them; `gold_score` is the noise-free taste (the gold reward the
learned reward model is measured against). A `SimulatedLabeler` adds its own
seeded noise: a jitter of the persona's weights (a labeler's private taste) and
Gaussian noise on every score (attention), and calls scores closer than
`tie_margin` a tie. So labelers of one persona agree on the whole but disagree
on close calls, as people do.
"""

import random
import re
from collections import Counter
from dataclasses import dataclass, replace

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

_WORD = re.compile(r"[a-z0-9']+")
_vader = None
_english = None


@dataclass(frozen=True)
class Persona:
    name: str
    relevance: float  # weight of the overlap with the reference answers
    fluency: float  # weight of the share of real English words
    friendliness: float  # weight of VADER sentiment
    brevity: float  # weight of shortness
    noise: float = 0.03  # std of the Gaussian noise a labeler adds to each score
    tie_margin: float = 0.02  # scores closer than this are ranked as a tie


PERSONAS = {
    "balanced": Persona("balanced", relevance=0.5, fluency=0.25, friendliness=0.1, brevity=0.15),
    "helpful": Persona("helpful", relevance=0.65, fluency=0.25, friendliness=0.05, brevity=0.05),
    "friendly": Persona("friendly", relevance=0.2, fluency=0.2, friendliness=0.5, brevity=0.1),
    "concise": Persona("concise", relevance=0.35, fluency=0.2, friendliness=0.05, brevity=0.4),
}


def persona(name):
    if name not in PERSONAS:
        from .errors import DataError

        raise DataError(f"no persona named {name!r} (personas: {', '.join(PERSONAS)})")
    return PERSONAS[name]


def words(text):
    return _WORD.findall(text.lower())


# Function words: what any reply to any question shares, so they say nothing about relevance.
FUNCTION_WORDS = frozenset("""
a an the and or but if so as of to in on at by for with from up down out over about into than then there here
i me my mine myself you your yours yourself he him his she her hers it its itself we us our they them their
this that these those who whom whose which what when where why how
am is are was were be been being do does did done doing have has had having will would shall should can could
may might must not no nor yes too very just also only all any some each every more most much many such own
i'm i've i'll i'd you're you've you'll he's she's it's we're they're that's there's what's let's
don't doesn't didn't isn't aren't wasn't weren't can't cannot won't wouldn't shouldn't couldn't haven't hasn't
oh ok okay well really yeah thing things something anything nothing
""".split())


def content_words(text):
    return [w for w in words(text) if w not in FUNCTION_WORDS]


def token_f1(a, b, tokens=words):
    """F1 of the bag-of-words overlap of two texts (SQuAD's answer metric)."""
    ta, tb = Counter(tokens(a)), Counter(tokens(b))
    common = sum((ta & tb).values())
    if common == 0:
        return 0.0
    p, r = common / sum(ta.values()), common / sum(tb.values())
    return 2 * p * r / (p + r)


def relevance(prompt, completion, references=None):
    """Content-word F1 with the best reference answer, or with the question where it has none;
    all words for a reference made only of function words ("Yes.", "No, not you.")."""
    refs = [r for r in references or [] if r] or [prompt]
    return max(token_f1(completion, r, content_words if content_words(r) else words) for r in refs)


def english_words():
    """The words of the built-in corpora (King James Bible, English chatterbot-corpus), built once."""
    global _english
    if _english is None:
        from . import data

        vocab = set()
        for _, rec in data.read_jsonl(data.bible_path()):
            vocab.update(words(str(rec.get("text", ""))))
        for split in ("train", "heldout"):
            for conv in data.chatterbot_conversations(split):
                for m in conv:
                    vocab.update(words(m["content"]))
        _english = frozenset(vocab)
    return _english


def fluency(completion):
    ws, vocab = words(completion), english_words()
    return sum(w in vocab for w in ws) / len(ws) if ws else 0.0


def friendliness(completion):
    global _vader
    if _vader is None:
        _vader = SentimentIntensityAnalyzer()
    return (_vader.polarity_scores(completion)["compound"] + 1) / 2


def brevity(completion):
    return 1.0 / (1.0 + len(words(completion)) / 30)


def features(prompt, completion, references=None):
    return {"relevance": relevance(prompt, completion, references), "fluency": fluency(completion),
            "friendliness": friendliness(completion), "brevity": brevity(completion)}


def taste(p: Persona, feats):
    return (p.relevance * feats["relevance"] + p.fluency * feats["fluency"] + p.friendliness * feats["friendliness"]
            + p.brevity * feats["brevity"])


def gold_score(prompt, completion, references=None, persona_name="balanced"):
    """The noise-free taste of a persona: the gold reward. A completion without a word
    (empty, or only punctuation) scores 0: it is neither brief nor friendly, only empty."""
    if not words(completion):
        return 0.0
    return taste(persona(persona_name), features(prompt, completion, references))


def ranks_from_scores(scores, tie_margin=0.0):
    """Dense ranks, 0 for the best score; a score within tie_margin of the one above shares its rank."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks, r = [0] * len(scores), 0
    for pos, i in enumerate(order):
        if pos and scores[order[pos - 1]] - scores[i] > tie_margin:
            r += 1
        ranks[i] = r
    return ranks


class SimulatedLabeler:
    """One simulated person of a persona; `seed` fixes their taste jitter and their noise."""

    def __init__(self, persona_name="balanced", seed=0, noise=None):
        base = persona(persona_name)
        self.rng = random.Random(seed)
        jitter = lambda w: max(0.0, w * (1 + self.rng.gauss(0, 0.25)))  # noqa: E731
        self.persona = replace(base, relevance=jitter(base.relevance), fluency=jitter(base.fluency),
                               friendliness=jitter(base.friendliness), brevity=jitter(base.brevity),
                               noise=base.noise if noise is None else noise)

    def scores(self, prompt, completions, references=None):
        return [(taste(self.persona, features(prompt, c, references)) if words(c) else 0.0)
                + self.rng.gauss(0, self.persona.noise) for c in completions]

    def rank(self, prompt, completions, references=None):
        """(ranks, flags): ranks 0 best with ties, flags as a person would set them."""
        s = self.scores(prompt, completions, references)
        flags = ["all_bad"] if max(s) < 0.15 else []
        return ranks_from_scores(s, self.persona.tie_margin), flags
