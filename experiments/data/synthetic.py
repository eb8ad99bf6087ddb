"""Generated tasks so that tests and the offline demo need no data files.

Each generator is a pure function of (size, seed) and returns a :class:`readers.RawSplit` whose labels are
already label names. The tasks are learnable by construction and defeat the shortcut a bag of words would
take:

* ``sentiment``: "the plot was not very clever , overall" -- the label is the adjective's polarity,
  flipped by a negation word; half the examples of each label are negated, so the adjective alone is at
  chance. Labels are exactly balanced.
* ``graded_sentiment``: the same vocabulary in constructions of graded difficulty, for a demo whose models
  differ the way they do on real data: plain and negated clauses, "far from" / "anything but", contrast
  ("X but Y", "although X , Y": the main clause decides), claims that negate a whole clause ("it is not true
  that ...", so a negated clause inside is a double negation), and :data:`GRADED_NOISE` of the labels flipped
  at random in every split (so no model can be perfect). Labels balanced before the noise.
* ``pairs``: paraphrase detection over (subject, verb, object) facts; the second sentence restates the
  fact with a synonym verb and another frame (label ``paraphrase``) or changes one slot or swaps subject
  and object (label ``different``), so word overlap alone does not decide. Labels exactly balanced.
* ``ner``: templated sentences with PER/ORG/LOC entities (BIO tags), some entity words ambiguous between
  types ("jordan" is a person or a place) so that context decides.
"""

from __future__ import annotations

import numpy as np

from experiments.data.readers import RawSplit

SUBJECTS = ("the movie", "this film", "the plot", "the acting", "the soundtrack", "the ending", "the script",
            "the cast", "the story", "the dialogue")
POSITIVE = ("good", "great", "wonderful", "brilliant", "charming", "delightful", "moving", "funny", "superb",
            "clever")
NEGATIVE = ("bad", "awful", "boring", "dull", "terrible", "clumsy", "tedious", "bland", "weak", "painful")
NEGATIONS = ("not", "never", "hardly")
COPULAS = ("is", "was", "seems", "felt")
INTENSIFIERS = ("", "very", "really", "truly", "quite")
SENTIMENT_FRAMES = ("{clause}", "i think {clause}", "{clause} , overall", "honestly , {clause}",
                    "{clause} from start to finish")
SENTIMENT_LABELS = ("negative", "positive")
FLIPPERS = ("far from", "anything but")  # intensity phrases that reverse the adjective
CLAIMS = ("it is not true that {clause}", "nobody would say {clause}", "i would never claim {clause}")
CONTRASTS = ("{first} but {second}", "although {first} , {second}", "{first} , however {second}")
GRADED_MIX = {"plain": 0.2, "negated": 0.2, "flipper": 0.1, "contrast": 0.25, "claim": 0.25}
GRADED_NOISE = 0.04  # share of labels flipped at random

PEOPLE = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")
VERBS = {  # meaning -> surface forms
    "likes": ("likes", "enjoys", "is fond of"),
    "helps": ("helps", "assists", "supports"),
    "calls": ("calls", "phones", "rings"),
    "meets": ("meets", "sees", "runs into"),
    "trusts": ("trusts", "believes in", "relies on"),
}
PAIR_FRAMES = ("{s} {v} {o}", "it is true that {s} {v} {o}", "as everyone knows , {s} {v} {o}",
               "{s} {v} {o} , they say")
PAIR_LABELS = ("different", "paraphrase")

ENTITIES = {
    "PER": ("john smith", "mary jones", "ali khan", "wei chen", "anna", "pedro alvarez", "jordan",
            "washington", "sara lee", "tom"),
    "ORG": ("acme corp", "globex", "initech", "the united nations", "red cross", "tesla motors", "umbrella",
            "jordan foods", "stark industries", "oxfam"),
    "LOC": ("paris", "new york", "berlin", "cape town", "jordan", "washington", "tokyo", "lake tahoe", "lima",
            "rio de janeiro"),
}
NER_TEMPLATES = (
    "{PER} works for {ORG} in {LOC} .",
    "{PER} visited {LOC} last week .",
    "{ORG} opened an office in {LOC} .",
    "yesterday {PER} met {PER} at {ORG} .",
    "the weather in {LOC} was nice .",
    "{PER} said {ORG} will grow .",
    "shares of {ORG} fell sharply .",
    "nothing much happened today .",
)
NER_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")


def _rng(seed: int, split: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, split]))


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sentiment(size: int, seed: int, split: int = 0) -> RawSplit:
    """``size`` single sentences; label ``positive`` iff (adjective positive) xor (negated)."""
    rng = _rng(seed, split)
    texts, labels = [], []
    for i in range(size):
        label = i % 2
        negated = bool(rng.integers(2))
        adjective = _choice(rng, POSITIVE if label ^ negated else NEGATIVE)
        words = [_choice(rng, SUBJECTS), _choice(rng, COPULAS)]
        words += [_choice(rng, NEGATIONS)] if negated else []
        words += [_choice(rng, INTENSIFIERS), adjective]
        clause = " ".join(w for w in words if w)
        texts.append(_choice(rng, SENTIMENT_FRAMES).format(clause=clause))
        labels.append(SENTIMENT_LABELS[label])
    order = rng.permutation(size)
    return RawSplit(f"synthetic(seed={seed}, split={split})", [labels[i] for i in order],
                    [int(i) + 1 for i in order], texts=[texts[i] for i in order])


def _clause(rng, polarity: int, negate: bool | None = None) -> str:
    """A clause of ``polarity`` (1 positive): subject, copula, an optional negation, an adjective."""
    negated = bool(rng.integers(2)) if negate is None else negate
    adjective = _choice(rng, POSITIVE if polarity ^ negated else NEGATIVE)
    words = [_choice(rng, SUBJECTS), _choice(rng, COPULAS)] + ([_choice(rng, NEGATIONS)] if negated else [])
    return " ".join(w for w in words + [_choice(rng, INTENSIFIERS), adjective] if w)


def graded_sentiment(size: int, seed: int, split: int = 0) -> RawSplit:
    """``size`` single sentences of the constructions in :data:`GRADED_MIX` (see the module docstring); the
    label is the polarity of the whole sentence, then :data:`GRADED_NOISE` of the labels are flipped."""
    rng = _rng(seed, split)
    kinds, weights = tuple(GRADED_MIX), np.array(tuple(GRADED_MIX.values()))
    texts, labels = [], []
    for i in range(size):
        label = i % 2
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        if kind == "plain":
            text = _clause(rng, label, negate=False)
        elif kind == "negated":
            text = _clause(rng, label, negate=True)
        elif kind == "flipper":
            text = f"{_choice(rng, SUBJECTS)} {_choice(rng, COPULAS)} {_choice(rng, FLIPPERS)} " + _choice(
                rng, NEGATIVE if label else POSITIVE)
        elif kind == "contrast":  # the second (main) clause decides; the first has the other polarity
            text = _choice(rng, CONTRASTS).format(first=_clause(rng, 1 - label), second=_clause(rng, label))
        else:  # a claim negates its clause: a negated clause inside is a double negation
            text = _choice(rng, CLAIMS).format(clause=_clause(rng, 1 - label))
        texts.append(_choice(rng, SENTIMENT_FRAMES[:3]).format(clause=text) if kind != "contrast" else text)
        labels.append(label ^ int(rng.random() < GRADED_NOISE))
    order = rng.permutation(size)
    return RawSplit(f"synthetic_graded(seed={seed}, split={split})", [SENTIMENT_LABELS[labels[i]] for i in order],
                    [int(i) + 1 for i in order], texts=[texts[i] for i in order])


def _say(rng, fact) -> str:
    s, verb, o = fact
    return _choice(rng, PAIR_FRAMES).format(s=s, v=_choice(rng, VERBS[verb]), o=o)


def pairs(size: int, seed: int, split: int = 0) -> RawSplit:
    """``size`` sentence pairs; label ``paraphrase`` iff both state the same (subject, verb, object)."""
    rng = _rng(seed, split)
    verbs = tuple(VERBS)
    texts, texts_b, labels = [], [], []
    for i in range(size):
        s, o = (PEOPLE[j] for j in rng.choice(len(PEOPLE), 2, replace=False))
        fact = (s, _choice(rng, verbs), o)
        other = fact
        if i % 2 == 0:
            change = int(rng.integers(4))
            if change == 0:  # swap roles: same words, different meaning
                other = (o, fact[1], s)
            elif change == 1:
                other = (s, _choice(rng, tuple(v for v in verbs if v != fact[1])), o)
            else:  # replace the subject or the object by a third person
                third = _choice(rng, tuple(p for p in PEOPLE if p not in (s, o)))
                other = (third, fact[1], o) if change == 2 else (s, fact[1], third)
        texts.append(_say(rng, fact))
        texts_b.append(_say(rng, other))
        labels.append(PAIR_LABELS[int(other == fact)])
    order = rng.permutation(size)
    return RawSplit(f"synthetic_pair(seed={seed}, split={split})", [labels[i] for i in order],
                    [int(i) + 1 for i in order], texts=[texts[i] for i in order],
                    texts_b=[texts_b[i] for i in order])


def ner(size: int, seed: int, split: int = 0) -> RawSplit:
    """``size`` tagged sentences (BIO over PER/ORG/LOC) from :data:`NER_TEMPLATES`."""
    rng = _rng(seed, split)
    tokens, tags = [], []
    for _ in range(size):
        words, labels = [], []
        for piece in _choice(rng, NER_TEMPLATES).split():
            if piece.startswith("{"):
                kind = piece[1:-1]
                entity = _choice(rng, ENTITIES[kind]).split()
                words += entity
                labels += [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
            else:
                words.append(piece)
                labels.append("O")
        tokens.append(words)
        tags.append(labels)
    lines = [[i + 1] * len(t) for i, t in enumerate(tags)]
    return RawSplit(f"synthetic_ner(seed={seed}, split={split})", tags, lines, tokens=tokens)
