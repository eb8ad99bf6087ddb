import collections

import numpy as np

from experiments.data import synthetic
from experiments.data.tasks import load_task


def test_deterministic_by_seed_and_split():
    a, b = synthetic.sentiment(50, seed=3), synthetic.sentiment(50, seed=3)
    assert a.texts == b.texts and a.labels == b.labels
    assert synthetic.sentiment(50, seed=4).texts != a.texts
    assert synthetic.sentiment(50, seed=3, split=1).texts != a.texts
    assert synthetic.ner(20, seed=1).tokens == synthetic.ner(20, seed=1).tokens
    assert synthetic.pairs(20, seed=1).texts_b == synthetic.pairs(20, seed=1).texts_b


def test_sentiment_balanced_and_negation_flips_the_label():
    raw = synthetic.sentiment(2000, seed=0)
    assert collections.Counter(raw.labels) == {"positive": 1000, "negative": 1000}
    by_adjective = collections.Counter()
    for text, label in zip(raw.texts, raw.labels):
        words = text.split()
        positive = [w for w in words if w in synthetic.POSITIVE]
        negative = [w for w in words if w in synthetic.NEGATIVE]
        assert len(positive) + len(negative) == 1, text
        negated = any(w in synthetic.NEGATIONS for w in words)
        assert label == ("positive" if bool(positive) != negated else "negative"), text
        by_adjective[bool(positive), label] += 1
    # The adjective alone is near chance: negation is needed to learn the task.
    share = by_adjective[True, "positive"] / (by_adjective[True, "positive"] + by_adjective[True, "negative"])
    assert 0.4 < share < 0.6


def parse_fact(text: str):
    words = " " + text + " "
    verb = next(m for m, forms in synthetic.VERBS.items() if any(f" {f} " in words for f in forms))
    people = [w for w in text.split() if w in synthetic.PEOPLE]
    assert len(people) == 2, text
    return people[0], verb, people[1]


def test_pairs_balanced_and_label_is_fact_equality():
    raw = synthetic.pairs(1000, seed=0)
    assert collections.Counter(raw.labels) == {"paraphrase": 500, "different": 500}
    swapped = 0
    for a, b, label in zip(raw.texts, raw.texts_b, raw.labels):
        fa, fb = parse_fact(a), parse_fact(b)
        assert label == ("paraphrase" if fa == fb else "different"), (a, b)
        swapped += fa != fb and {fa[0], fa[2]} == {fb[0], fb[2]} and fa[1] == fb[1]
    assert swapped > 50  # same words, different meaning: overlap alone does not decide


def test_ner_tags_mark_lexicon_entities_in_template_slots():
    raw = synthetic.ner(500, seed=0)
    types_of = collections.defaultdict(set)
    for words, tags in zip(raw.tokens, raw.labels):
        assert len(words) == len(tags)
        skeleton, i = [], 0
        while i < len(words):
            if tags[i] == "O":
                skeleton.append(words[i])
                i += 1
                continue
            assert tags[i].startswith("B-"), (words, tags)
            kind, j = tags[i][2:], i + 1
            while j < len(tags) and tags[j] == f"I-{kind}":
                j += 1
            entity = " ".join(words[i:j])
            assert entity in synthetic.ENTITIES[kind]
            types_of[entity].add(kind)
            skeleton.append("{" + kind + "}")
            i = j
        assert " ".join(skeleton) in synthetic.NER_TEMPLATES
    assert types_of["jordan"] == {"PER", "LOC"}  # context decides
    counts = collections.Counter(t for tags in raw.labels for t in tags if t.startswith("B-"))
    assert max(counts.values()) < 1.5 * min(counts.values())


def test_synthetic_tasks_through_load_task():
    task = load_task("synthetic", synthetic_size=(40, 10), seed=5, word_vocab="build")
    assert (len(task.train), len(task.dev)) == (40, 10) and task.label_names == ["negative", "positive"]
    assert np.bincount(task.train.labels).tolist() == [20, 20]
    assert load_task("synthetic", synthetic_size=(40, 10), seed=5).train.texts == task.train.texts
    pair = load_task("synthetic_pair", synthetic_size=8, word_vocab="build")
    assert pair.is_pair and len(pair.dev) == 2 and "word_ids_b" in next(pair.train.batches(4))
    ner = load_task("synthetic_ner", synthetic_size=8)
    assert ner.kind == "token" and ner.metric_names == ["span_f1"]


def _graded_rule(text: str) -> str:
    """The label of a graded sentence read off its words, independently of the generator: the main clause of a
    contrast decides; a claim, a negation word and "far from" / "anything but" each flip the adjective."""
    if " but " in text and "anything but" not in text:
        text = text.split(" but ", 1)[1]
    elif text.startswith("although"):
        text = text.split(" , ", 1)[1]
    elif ", however" in text:
        text = text.split(", however", 1)[1]
    flips = 0
    for claim in synthetic.CLAIMS:
        prefix = claim.split("{")[0].strip()
        if prefix in text:
            text, flips = text.replace(prefix, ""), flips + 1
    words = f" {text} "
    flips += sum(words.count(f" {n} ") for n in synthetic.NEGATIONS) + sum(text.count(f) for f in synthetic.FLIPPERS)
    positive = [a for a in synthetic.POSITIVE if f" {a} " in words]
    negative = [a for a in synthetic.NEGATIVE if f" {a} " in words]
    assert len(positive) + len(negative) == 1, text
    return synthetic.SENTIMENT_LABELS[int(bool(positive)) ^ (flips % 2)]


def test_graded_sentiment_follows_its_rule_but_for_the_label_noise():
    raw = synthetic.graded_sentiment(4000, seed=3)
    wrong = np.mean([_graded_rule(t) != label for t, label in zip(raw.texts, raw.labels)])
    assert abs(wrong - synthetic.GRADED_NOISE) < 0.012  # 4% flipped, binomial sd 0.3% over 4000
    kinds = {"contrast": sum(" but " in t and "anything but" not in t or t.startswith("although") or ", however" in t
                             for t in raw.texts),
             "claim": sum(any(c.split("{")[0].strip() in t for c in synthetic.CLAIMS) for t in raw.texts)}
    assert all(800 <= n <= 1200 for n in kinds.values()), kinds  # a quarter each
    assert abs(raw.labels.count("positive") - 2000) < 100
