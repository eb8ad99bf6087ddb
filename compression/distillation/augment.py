"""Transfer-set augmentation after Tang et al. (2019), "Distilling task-specific knowledge from BERT into
simple neural networks", Algorithm 1.

A small student needs far more examples than the labeled set to match its teacher; the teacher labels
synthetic sentences made from the training sentences (the transfer set). For each sentence, each of
``n_per_sentence`` draws goes through every word once with one uniform draw ``X``:

* ``X < p_mask``: masking -- the word becomes ``mask_token`` (``[MASK]`` for a BERT teacher; the student
  reads it as its unknown word);
* ``p_mask <= X < p_mask + p_pos``: POS-guided replacement -- the word becomes a word with the same
  part-of-speech tag, drawn from the corpus's unigram distribution renormalised within that tag;
* otherwise the word is kept.

Then, with probability ``p_ng``, n-gram sampling keeps only a random n-gram of the result, ``n`` uniform
in 1..``max_ngram`` (the whole sentence when it is shorter). Synthetic sentences equal to any original
sentence, or to one produced before, are dropped (``dedupe``), so a sentence yields at most
``n_per_sentence`` new ones. Everything is deterministic given ``seed``: sentence ``i`` uses the stream
``numpy.random.default_rng([seed, i])``, so augmenting a subset gives the same samples for it.

POS tags: no POS tagger is available offline here (Tang et al. used spaCy). The default
:func:`heuristic_tag` is a SUBSTITUTE, not a tagger: closed-class words (determiners, pronouns,
prepositions, conjunctions, auxiliaries, wh-words, negation...) get their class from fixed lists;
numbers and punctuation are recognised by their characters; open-class words get a class from their suffix
(``-ly`` adverb, ``-ing`` / ``-ed`` verb forms, ``-tion``/``-ness``/... nouns, ``-ous``/``-ful``/``-able``/...
adjectives, ``-s`` plural-or-third-person forms); every other word falls into one ``"OPEN"`` class (nouns,
verbs and adjectives without a telling suffix, mixed). Replacements therefore keep function words within
their class but can turn a bare noun into a bare verb or adjective. Pass ``tagger=`` (a function from a
token list to a tag list, e.g. wrapping spaCy where it is installed) to use a real tagger instead.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence

import numpy as np

MASK_TOKEN = "[MASK]"
Tagger = Callable[[Sequence[str]], Sequence[str]]

# Closed-class words. A word listed under several classes keeps the first (dict order).
_CLOSED_CLASSES: dict[str, str] = {
    "DET": "the a an this these those every each some any no all both either neither another such",
    "PRON": ("i me my mine myself you your yours yourself yourselves he him his himself she her hers herself "
             "it its itself we us our ours ourselves they them their theirs themselves someone anyone "
             "everyone nobody something anything everything nothing somebody anybody everybody"),
    "WH": "who whom whose what which when where why how whatever whoever",
    "AUX": ("is am are was were be been being have has had having do does did will would shall should can "
            "could may might must 's 're 've 'd 'll 'm ca wo"),
    "NEG": "not n't never",
    "CCONJ": "and or but nor yet",
    "SCONJ": "if because although though while whereas unless whether once that than",
    "ADP": ("of in on at by for with about against between into through during before after above below to "
            "from up down over under via within without among toward towards upon across along around "
            "behind beside besides beyond despite except inside outside near off onto past since "
            "throughout till until unlike like per"),
    "ADV": ("very too also just only even still already quite rather almost always often sometimes here "
            "there now then so again ever yet soon perhaps maybe well"),
    "INTJ": "oh yes yeah wow hey ah uh",
}
CLOSED_CLASS: dict[str, str] = {}
for _tag, _words in _CLOSED_CLASSES.items():
    for _w in _words.split():
        CLOSED_CLASS.setdefault(_w, _tag)

# Open-class suffix rules, tried in order (longest, most specific first); the stem must keep >= 3 letters.
_SUFFIX_RULES: tuple[tuple[str, str], ...] = (
    ("ly", "ADV-LY"), ("ing", "VERB-ING"), ("ed", "VERB-ED"),
    ("tion", "NOUN"), ("sion", "NOUN"), ("ment", "NOUN"), ("ness", "NOUN"), ("ity", "NOUN"), ("ship", "NOUN"),
    ("hood", "NOUN"), ("ism", "NOUN"), ("ist", "NOUN"), ("ance", "NOUN"), ("ence", "NOUN"),
    ("ous", "ADJ"), ("ful", "ADJ"), ("less", "ADJ"), ("able", "ADJ"), ("ible", "ADJ"), ("ive", "ADJ"),
    ("ical", "ADJ"), ("ic", "ADJ"), ("ish", "ADJ"), ("est", "ADJ-EST"),
)


def heuristic_tag(word: str) -> str:
    """A part-of-speech-like class for ``word`` from word lists and suffixes (a substitute; module doc)."""
    if not word:
        raise ValueError("heuristic_tag: empty word")
    if word == MASK_TOKEN or (word.startswith("[") and word.endswith("]") and word[1:-1].isupper()) \
            or (word.startswith("<") and word.endswith(">")):
        return "SPECIAL"
    lower = word.lower()
    if lower in CLOSED_CLASS:
        return CLOSED_CLASS[lower]
    if not any(c.isalnum() for c in word):
        return "PUNCT"
    if any(c.isdigit() for c in word) and all(c.isdigit() or c in ".,:/-%" for c in word):
        return "NUM"
    if lower.isalpha():
        for suffix, tag in _SUFFIX_RULES:
            if lower.endswith(suffix) and len(lower) - len(suffix) >= 3:
                return tag
        if lower.endswith("s") and not lower.endswith(("ss", "us", "is")) and len(lower) >= 4:
            return "S-FORM"
    return "OPEN"


def heuristic_tags(tokens: Sequence[str]) -> list[str]:
    """:func:`heuristic_tag` of each token (the default ``tagger``)."""
    return [heuristic_tag(t) for t in tokens]


def _tokens(sentence: str | Sequence[str]) -> list[str]:
    if isinstance(sentence, str):
        return sentence.split()
    tokens = list(sentence)
    if not all(isinstance(t, str) and t and not any(c.isspace() for c in t) for t in tokens):
        raise ValueError(f"a token list must hold non-empty strings without whitespace, got {tokens!r}")
    return tokens


class _Lexicon:
    """Per tag: the corpus's words and their cumulative unigram probabilities."""

    def __init__(self, tagged: Iterable[tuple[list[str], Sequence[str]]]):
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for tokens, tags in tagged:
            for word, tag in zip(tokens, tags):
                counts[tag][word] += 1
        self.words: dict[str, list[str]] = {}
        self.cumulative: dict[str, np.ndarray] = {}
        for tag, counter in counts.items():
            words = sorted(counter)  # sorted: independent of corpus order and hash seeds
            freq = np.array([counter[w] for w in words], np.float64)
            self.words[tag] = words
            self.cumulative[tag] = np.cumsum(freq) / freq.sum()

    def sample(self, tag: str, rng: np.random.Generator) -> str | None:
        if tag not in self.words:
            return None
        i = int(np.searchsorted(self.cumulative[tag], rng.random(), side="right"))
        return self.words[tag][min(i, len(self.words[tag]) - 1)]


class _Augmenter:
    def __init__(self, lexicon: _Lexicon, *, p_mask: float, p_pos: float, p_ng: float, max_ngram: int,
                 mask_token: str):
        self.lexicon, self.p_mask, self.p_pos, self.p_ng = lexicon, p_mask, p_pos, p_ng
        self.max_ngram, self.mask_token = max_ngram, mask_token

    def sample(self, tokens: list[str], tags: Sequence[str], rng: np.random.Generator) -> list[str]:
        """One synthetic sentence: per-word masking / same-tag replacement, then maybe n-gram sampling."""
        out = []
        for word, tag in zip(tokens, tags):
            x = rng.random()
            if tag == "SPECIAL" or word == self.mask_token:
                out.append(word)
            elif x < self.p_mask:
                out.append(self.mask_token)
            elif x < self.p_mask + self.p_pos:
                out.append(self.lexicon.sample(tag, rng) or word)
            else:
                out.append(word)
        if out and rng.random() < self.p_ng:
            n = min(int(rng.integers(1, self.max_ngram + 1)), len(out))
            start = int(rng.integers(0, len(out) - n + 1))
            out = out[start:start + n]
        return out


def _check_args(n: int, seed: int, p_mask: float, p_pos: float, p_ng: float, max_ngram: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n_per_sentence must be an int >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    for name, p in (("p_mask", p_mask), ("p_pos", p_pos), ("p_ng", p_ng)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if p_mask + p_pos > 1.0:
        raise ValueError(f"p_mask + p_pos must be <= 1 (one draw per word chooses), got {p_mask} + {p_pos}")
    if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or max_ngram < 1:
        raise ValueError(f"max_ngram must be an int >= 1, got {max_ngram!r}")


def _tag_all(sentences: Sequence[list[str]], tagger: Tagger) -> list[Sequence[str]]:
    tagged = []
    for tokens in sentences:
        tags = list(tagger(tokens))
        if len(tags) != len(tokens):
            raise ValueError(f"tagger returned {len(tags)} tags for {len(tokens)} tokens: {tokens!r}")
        tagged.append(tags)
    return tagged


def augment(sentences: Sequence[str | Sequence[str]], n_per_sentence: int, seed: int, *, p_mask: float = 0.1,
            p_pos: float = 0.1, p_ng: float = 0.25, max_ngram: int = 5, mask_token: str = MASK_TOKEN,
            tagger: Tagger = heuristic_tags, corpus: Sequence[str | Sequence[str]] | None = None,
            dedupe: bool = True) -> list[str]:
    """The transfer set: up to ``n_per_sentence`` synthetic sentences per input (see the module doc).

    Args:
      sentences: strings (split on whitespace) or token lists.
      n_per_sentence: draws per sentence (Tang et al.: 20 for SST-2, 10 elsewhere).
      seed: int >= 0; the output is a function of the arguments and the seed.
      p_mask, p_pos, p_ng: Tang et al.'s probabilities (their defaults 0.1, 0.1, 0.25).
      max_ngram: largest n of n-gram sampling (5).
      mask_token: what masking writes.
      tagger: token list -> tag list; default the :func:`heuristic_tags` substitute.
      corpus: sentences whose words (and unigram counts) replacements are drawn from; default ``sentences``.
      dedupe: drop samples equal to an original sentence or an earlier sample.

    Returns: synthetic sentences, tokens joined by single spaces, in input order.
    """
    if isinstance(sentences, str):
        raise TypeError("augment: sentences must be a sequence of sentences, not one string")
    out = _generate([[s] for s in sentences], n_per_sentence, seed, p_mask, p_pos, p_ng, max_ngram, mask_token,
                    tagger, corpus, dedupe)
    return [" ".join(tokens) for (tokens,) in out]


def augment_pairs(pairs: Sequence[tuple[str | Sequence[str], str | Sequence[str]]], n_per_pair: int, seed: int,
                  *, p_mask: float = 0.1, p_pos: float = 0.1, p_ng: float = 0.25, max_ngram: int = 5,
                  mask_token: str = MASK_TOKEN, tagger: Tagger = heuristic_tags,
                  corpus: Sequence[str | Sequence[str]] | None = None, dedupe: bool = True) -> list[tuple[str, str]]:
    """:func:`augment` for sentence pairs: each draw augments both sides independently (one random stream per
    pair); a pair is dropped when equal to an original pair or an earlier sample. Returns ``(a, b)`` strings.
    The lexicon is built from both sides (or ``corpus``).
    """
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"pairs[{i}] must be a (sentence_a, sentence_b) pair, got {pair!r}")
    out = _generate([list(p) for p in pairs], n_per_pair, seed, p_mask, p_pos, p_ng, max_ngram, mask_token,
                    tagger, corpus, dedupe)
    return [(" ".join(a), " ".join(b)) for a, b in out]


def _generate(groups: Sequence[Sequence[str | Sequence[str]]], n: int, seed: int, p_mask: float, p_pos: float,
              p_ng: float, max_ngram: int, mask_token: str, tagger: Tagger, corpus, dedupe: bool):
    """Augments groups of sentences (one sentence, or a pair) together: a list of token-list tuples."""
    _check_args(n, seed, p_mask, p_pos, p_ng, max_ngram)
    token_groups = [[_tokens(s) for s in g] for g in groups]
    tag_groups = [_tag_all(g, tagger) for g in token_groups]
    if corpus is None:
        lex_source = [(t, tg) for g, tgs in zip(token_groups, tag_groups) for t, tg in zip(g, tgs)]
    else:
        corpus_tokens = [_tokens(s) for s in corpus]
        lex_source = list(zip(corpus_tokens, _tag_all(corpus_tokens, tagger)))
    augmenter = _Augmenter(_Lexicon(lex_source), p_mask=p_mask, p_pos=p_pos, p_ng=p_ng, max_ngram=max_ngram,
                           mask_token=mask_token)

    def key(parts):
        return tuple(" ".join(p) for p in parts)

    seen = {key(g) for g in token_groups} if dedupe else set()
    results = []
    for i, (tokens, tags) in enumerate(zip(token_groups, tag_groups)):
        if not any(tokens):
            continue
        rng = np.random.default_rng([seed, i])
        for _ in range(n):
            parts = [augmenter.sample(t, tg, rng) for t, tg in zip(tokens, tags)]
            k = key(parts)
            if dedupe:
                if k in seen:
                    continue
                seen.add(k)
            results.append(tuple(parts))
    return results
