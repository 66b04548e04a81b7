"""Simulated labelers ("personas") that rank completions by a written-down taste.

What people reward is a reply that answers *this* question. A reply that would fit
any question ("Yes.", "I am doing well.", "I am not sure.") answers none of them, and
people rank it low however short and polite it is. The taste (the "specific-2" taste)
has four parts, each in [0, 1]:

- relevance, specific to the question: how much better the reply answers its own question
  than the other questions people ask,

      new(x, q)  = the words of x that are not words of the question q
      fit(c, q)  = max over q's reference answers r of the IDF-weighted F1 of
                   new(c, q)'s content words with new(r, q)'s
      relevance  = max(0, fit(c, q) - mean over the other questions q' of fit(c, q'))

  Only what a reply adds to the question counts: repeating the question's words is not an
  answer (echoing the question back earns nothing), and a reference is read for what it
  adds too ("A cat is a small animal." to "What is a cat?" is {small, animal}).
  Content words leave out function words ("I", "do", "you", "the"), which any reply
  shares with any question; a reference made only of them ("Yes.", "No.") is matched on
  all its words. IDF weights (over the built-in questions and their answers) make a
  rare topical word ("sapient", "RAM") count for more than a common one ("like",
  "think"), so a kitchen-sink reply of common words fits many questions weakly. The
  mean over the other questions (the built-in chatterbot-corpus questions, about 750)
  takes away what a reply earns everywhere: a reply that fits every question equally
  gets nothing.
- fluency: the share of the completion's words that are English words, i.e. words of
  the built-in corpora (the King James Bible and the English chatterbot-corpus, about
  15,000 words). People punish gibberish, on topic or not;
- friendliness: VADER's compound sentiment of the completion, mapped to [0, 1];
- brevity: 1 / (1 + words / 30), so a 30-word answer scores 0.5.

A persona weighs them, with relevance as a gate on manner (friendliness and brevity):

      taste = w_rel x relevance + w_flu x fluency
              + (w_fri x friendliness + w_bre x brevity) x gate(relevance)
      gate(r) = OFF_TOPIC + (1 - OFF_TOPIC) x min(1, r / ON_TOPIC)^2

Manner counts in full only for a reply on the question's topic (relevance ON_TOPIC or
more) and at OFF_TOPIC (a twentieth) for one that is not: brevity and politeness are
what a reply made for every question maximises ("Yes.": brief, positive), so no amount
of them makes an off-topic reply beat an on-topic one. Fluency is not gated: among
off-topic replies people still prefer real words to gibberish, and every reference is
fluent, so it gives a one-size-fits-all reply nothing a model lacks. The gate is
squared so that a partial fit earns little of it.

tests/test_simulated.py holds the taste to that, for every persona and every simulated
labeler: over the held-out questions the best single reply given to all of them (every
answer of the corpus, generic replies, kitchen sinks of common words) earns less than
a model that answers on topic one time in twenty (the question's own reference) and
gives another question's reference otherwise, and far less than the references; so
does answering each question with the question itself.
The tastes before this one were won by a trick: "specific" (the same, but the reply's
fit to the question's own words counted 0.3) by echoing each question back (0.49, the
balanced persona, against 0.29 for the model on topic one time in twenty); the first
(relevance as unspecific content-word overlap, every part a plain weighted sum) by
"Yes." given to every question.

`gold_score` is a persona's noise-free taste (the gold reward the learned reward model is
measured against). A `SimulatedLabeler` adds its own seeded noise: a jitter of the
persona's weights (a labeler's private taste) and Gaussian noise on every score
(attention), and calls scores closer than `tie_margin` a tie. So labelers of one
persona agree on the whole but disagree on close calls, as people do.
"""

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from ..errors import DataError

TASTE = "specific-2"  # the taste's name, recorded with the runs that use it (the report says which)
ON_TOPIC = 0.5  # relevance from which friendliness and brevity count in full
OFF_TOPIC = 0.05  # the share of them an off-topic reply (relevance 0) still gets

_WORD = re.compile(r"[a-z0-9']+")
_vader = None
_english = None
_pool = None


@dataclass(frozen=True)
class Persona:
    name: str
    relevance: float  # weight of the relevance specific to the question
    fluency: float  # weight of the share of real English words
    friendliness: float  # weight of VADER sentiment (gated by relevance)
    brevity: float  # weight of shortness (gated by relevance)
    noise: float = 0.03  # std of the Gaussian noise a labeler adds to each score
    tie_margin: float = 0.02  # scores closer than this are ranked as a tie


PERSONAS = {
    "balanced": Persona("balanced", relevance=0.5, fluency=0.25, friendliness=0.1, brevity=0.15),
    "helpful": Persona("helpful", relevance=0.65, fluency=0.25, friendliness=0.05, brevity=0.05),
    "friendly": Persona("friendly", relevance=0.3, fluency=0.2, friendliness=0.4, brevity=0.1),
    "concise": Persona("concise", relevance=0.35, fluency=0.2, friendliness=0.05, brevity=0.4),
}


def persona(name):
    if name not in PERSONAS:
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


# ---------------------------------------------------------------- relevance


def new_words(text, question):
    """The words of `text` that are not words of `question`: what it adds to the question."""
    asked = set(words(question))
    return [w for w in words(text) if w not in asked]


class _Text:
    """A reference as the relevance reads it: the bag of its content words (all its words when
    it has no content word, as "Yes." has none), and their IDF mass."""

    __slots__ = ("bag", "mass", "plain")

    def __init__(self, ws, idf):
        cw = [w for w in ws if w not in FUNCTION_WORDS]
        self.plain = not cw  # matched on all its words
        self.bag = Counter(cw or ws)
        self.mass = sum(idf(w) * n for w, n in self.bag.items())


def _f1(bag, mass, ref: _Text, idf):
    """IDF-weighted F1 of a reply's bag of words (and its IDF mass) with a reference's."""
    common = sum(idf(w) * min(n, ref.bag[w]) for w, n in bag.items() if w in ref.bag)
    if common == 0:
        return 0.0
    p, r = common / mass, common / ref.mass
    return 2 * p * r / (p + r)


class Pool:
    """The questions a reply's fit is compared against (the built-in chatterbot-corpus questions,
    train and held-out, with their answers), their words' IDF, and an index from a word to the
    questions whose answers hold it, so that a reply is compared only with those it can fit."""

    def __init__(self, questions):
        docs = [set(content_words(" ".join([q, *refs]))) for q, refs in questions]
        df = Counter(w for d in docs for w in d)
        n = len(docs)
        self._idf = {w: math.log((n + 1) / (c + 1)) + 1 for w, c in df.items()}
        self._unseen = math.log(n + 1) + 1
        self.entries = [[t for t in (self._text(r, q) for r in refs) if t.bag] for q, refs in questions]
        self.ids, self._totals = {}, {}  # question -> its entry ids; reply's new words -> (bags, total fit)
        for i, (q, _) in enumerate(questions):
            self.ids.setdefault(q, []).append(i)
        self.index, self.plain = {}, []  # word -> entry ids; entries with a reference matched on all words
        for i, refs in enumerate(self.entries):
            for t in refs:
                for w in t.bag:
                    self.index.setdefault(w, set()).add(i)
            if any(t.plain for t in refs):
                self.plain.append(i)

    def idf(self, w):
        return self._idf.get(w, self._unseen)

    @lru_cache(maxsize=100_000)
    def _text(self, ref, question):
        return _Text(new_words(ref, question), self.idf)

    def fit(self, reply, question, refs):
        """fit(c, q): the best IDF-weighted F1 of what the reply adds to the question with what a
        reference adds to it."""
        return self._fit(self._bags(reply, question), [self._text(r, question) for r in refs if r.strip()])

    @lru_cache(maxsize=100_000)
    def _bags(self, reply, question):
        """What the reply adds to the question: (bag, IDF mass) of its content words and of all its words."""
        ws = new_words(reply, question)
        out = []
        for bag in (Counter(w for w in ws if w not in FUNCTION_WORDS), Counter(ws)):
            out.append((bag, sum(self.idf(w) * n for w, n in bag.items())))
        return tuple(out)

    def _fit(self, bags, refs):
        (content, cmass), (every, emass) = bags
        return max([_f1(every, emass, t, self.idf) if t.plain else _f1(content, cmass, t, self.idf) if cmass else 0.0
                    for t in refs] + [0.0])

    def others(self, reply, question):
        """Mean fit of what the reply adds to `question` over the pool's other questions: its total
        fit over the pool (kept per bag of words) less its fit to `question`'s own entries."""
        bags = self._bags(reply, question)
        key = tuple(sorted(bags[1][0].items()))
        if key not in self._totals:
            if len(self._totals) > 100_000:
                self._totals.clear()
            near = set(self.plain).union(*(self.index.get(w, ()) for w in bags[1][0]))
            self._totals[key] = sum(self._fit(bags, self.entries[i]) for i in near)
        own = sum(self._fit(bags, self.entries[i]) for i in self.ids.get(question, ()))
        return (self._totals[key] - own) / max(len(self.entries) - len(self.ids.get(question, ())), 1)


def pool():
    """The built-in pool, built once."""
    global _pool
    if _pool is None:
        from ..data.prompts import builtin_prompts, prompt_text

        _pool = Pool([(prompt_text(r), r["references"]) for split in ("train", "heldout")
                      for r in builtin_prompts(split)])
    return _pool


@lru_cache(maxsize=65536)
def _relevance(prompt, completion, references):
    p = pool()
    return max(0.0, p.fit(completion, prompt, references) - p.others(completion, prompt))


def relevance(prompt, completion, references=None):
    """How much better what the completion adds to this prompt fits its references than the other
    questions' of the pool: 0 for a reply that fits them all alike, or only repeats the prompt."""
    return _relevance(prompt, completion, tuple(r for r in references or [] if r))


# ---------------------------------------------------------------- style


def english_words():
    """The words of the built-in corpora (King James Bible, English chatterbot-corpus), built once."""
    global _english
    if _english is None:
        from ..data.conversations import chatterbot_conversations
        from ..data.corpus import bible_path
        from ..data.rows import iter_rows

        vocab = set()
        for _, rec in iter_rows(bible_path()):
            vocab.update(words(str(rec.get("text", ""))))
        for split in ("train", "heldout"):
            for conv in chatterbot_conversations(split):
                for m in conv:
                    vocab.update(words(m["content"]))
        _english = frozenset(vocab)
    return _english


def fluency(completion):
    ws, vocab = words(completion), english_words()
    return sum(w in vocab for w in ws) / len(ws) if ws else 0.0


@lru_cache(maxsize=65536)
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


def on_topic_gate(rel):
    """The share of friendliness and brevity (manner) a reply of relevance `rel` gets."""
    return OFF_TOPIC + (1 - OFF_TOPIC) * min(1.0, rel / ON_TOPIC) ** 2


def taste(p: Persona, feats):
    manner = p.friendliness * feats["friendliness"] + p.brevity * feats["brevity"]
    return p.relevance * feats["relevance"] + p.fluency * feats["fluency"] + manner * on_topic_gate(feats["relevance"])


def gold_score(prompt, completion, references=None, persona_name="balanced"):
    """The noise-free taste of a persona: the gold reward. A completion without a word
    (empty, or only punctuation) scores 0: it is neither brief nor friendly, only empty."""
    if not words(completion):
        return 0.0
    return taste(persona(persona_name), features(prompt, completion, references))


def on_topic(prompt, completion, references=None):
    """Whether a reply holds a content word of the prompt or of one of its references (the
    demo's on-topic share: a plain count, independent of the taste's weights)."""
    topic = set(content_words(prompt)).union(*(content_words(r) for r in references or []))
    return bool(topic & set(content_words(completion)))


# Replies that would fit any question: the platitudes RL finds when the taste lets it.
GENERIC = ["Yes.", "No.", "I am doing well.", "I am well.", "I am not sure.", "What?", "I like it.", "I do you.",
           "Thank you so much, I am happy to help!", "Yes, I am happy.", "I love you.", "I am a computer program.",
           "That is a good question.", "I don't know.", "Thank you.", "Hello!"]


def best_constant(questions, replies, persona_name="balanced"):
    """(mean gold, reply): the best single reply, of `replies`, given to every one of
    `questions` ((prompt, references) pairs): what a policy that ignores the question earns."""
    return max((sum(gold_score(q, c, refs, persona_name) for q, refs in questions) / len(questions), c)
               for c in sorted(replies) if words(c))


def ranks_from_scores(scores, tie_margin=0.0):
    """Dense ranks, 0 for the best score; a score within tie_margin of the one above shares its rank."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks, r = [0] * len(scores), 0
    for pos, i in enumerate(order):
        if pos and scores[order[pos - 1]] - scores[i] > tie_margin:
            r += 1
        ranks[i] = r
    return ranks


MODES = ("normal", "random", "reverse")  # how a simulated labeler ranks, whatever their persona


class SimulatedLabeler:
    """One simulated person of a persona; `seed` fixes their taste jitter and their noise. `mode`
    "random" ranks at random (a careless labeler), "reverse" ranks worst first (an adversarial
    one); "normal" ranks by the persona's taste."""

    def __init__(self, persona_name="balanced", seed=0, noise=None, mode="normal"):
        if mode not in MODES:
            raise DataError(f"unknown labeler mode {mode!r}; known: {', '.join(MODES)}")
        base = persona(persona_name)
        self.mode = mode
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
        if self.mode == "random":
            return ranks_from_scores([self.rng.random() for _ in completions]), []
        s = self.scores(prompt, completions, references)
        flags = ["all_bad"] if max(s) < 0.15 else []
        if self.mode == "reverse":
            return ranks_from_scores([-x for x in s], self.persona.tie_margin), []
        return ranks_from_scores(s, self.persona.tie_margin), flags
