"""CIDEr-D, the captioning metric and reward, and a keyword reward.

CIDEr-D (Vedantam et al. 2015, as computed by coco-caption's `pycocoevalcap.cider`, which
is what papers report as "CIDEr"), for a hypothesis c and the references S of its image:

    g_n(s)    TF-IDF vector of the n-grams of s: tf(w, s) * log(N / max(1, df(w)))
              N = number of images in the reference corpus; df(w) = images whose
              references contain n-gram w
    CIDEr-D_n = 1/|S| * sum_{s in S} exp(-(l(c) - l(s))^2 / (2 sigma^2))
                * sum_w min(g_n(c)_w, g_n(s)_w) * g_n(s)_w / (|g_n(c)| |g_n(s)|)
    CIDEr-D   = 10 * mean_{n=1..4} CIDEr-D_n,  sigma = 6

l(.) is the length coco-caption uses: the number of bigrams (words - 1). The clipping
min(., .) and the length penalty are what make it "-D". This implementation matches
pycocoevalcap's `CiderScorer` to floating point when the document frequencies come from the
same references (tested). Unlike `CiderScorer`, the document frequencies are fixed from a
whole reference corpus once, so a single caption can be scored as an RL reward (coco-caption
recomputes them from whatever batch it is given, which makes a one-caption batch score 0).

Tokenisation: lower-case words of letters and digits (coco-caption's PTB tokenizer, which
needs Java, also drops punctuation; it additionally splits clitics like "n't").
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

from vlmgym_envs.core import as_text

MAX_CAPTION_WORDS = 256
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")

Ngrams = Counter[tuple[str, ...]]


def tokenize_caption(text: object) -> list[str]:
    """Lower-case word tokens of a caption (at most `MAX_CAPTION_WORDS`)."""
    s = unicodedata.normalize("NFKC", as_text(text)[: MAX_CAPTION_WORDS * 32]).lower()
    return _WORD.findall(s)[:MAX_CAPTION_WORDS]


def ngram_counts(words: Sequence[str], n: int = 4) -> Ngrams:
    """Counts of every k-gram, k = 1..n."""
    counts: Ngrams = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D with document frequencies from a fixed reference corpus.

    references: one sequence of reference captions per image of the corpus (raw text or
        pre-tokenised as space-separated words; both are tokenised with `tokenize_caption`).
    """

    def __init__(self, references: Iterable[Sequence[str]], n: int = 4, sigma: float = 6.0):
        self.n = n
        self.sigma = sigma
        self.df: Counter[tuple[str, ...]] = Counter()
        images = 0
        for refs in references:
            images += 1
            seen: set[tuple[str, ...]] = set()
            for ref in refs:
                seen.update(ngram_counts(tokenize_caption(ref), n))
            self.df.update(seen)
        if images == 0:
            raise ValueError("CIDEr-D needs a non-empty reference corpus")
        self.log_images = math.log(float(images))

    def _vector(self, counts: Ngrams) -> tuple[list[dict[tuple[str, ...], float]], list[float]]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        for gram, tf in counts.items():
            k = len(gram) - 1
            value = float(tf) * (self.log_images - math.log(max(1.0, float(self.df[gram]))))
            vec[k][gram] = value
            norm[k] += value * value
        return vec, [math.sqrt(x) for x in norm]

    def score(self, hypothesis: object, references: Sequence[str]) -> float:
        """CIDEr-D of one hypothesis against its image's references (>= 0; ~0..10)."""
        if not references:
            raise ValueError("CIDEr-D needs at least one reference")
        words = tokenize_caption(hypothesis)
        vec_h, norm_h = self._vector(ngram_counts(words, self.n))
        len_h = max(len(words) - 1, 0)
        total = [0.0] * self.n
        for ref in references:
            ref_words = tokenize_caption(ref)
            vec_r, norm_r = self._vector(ngram_counts(ref_words, self.n))
            delta = float(len_h - max(len(ref_words) - 1, 0))
            penalty = math.exp(-(delta**2) / (2 * self.sigma**2))
            for k in range(self.n):
                dot = sum(min(v, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0)
                          for g, v in vec_h[k].items())  # fmt: skip
                if norm_h[k] != 0 and norm_r[k] != 0:
                    dot /= norm_h[k] * norm_r[k]
                total[k] += dot * penalty
        return 10.0 * sum(total) / self.n / len(references)


STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "with",
        "and",
        "or",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "this",
        "that",
        "these",
        "those",
        "it",
        "its",
        "there",
        "their",
        "his",
        "her",
        "he",
        "she",
        "they",
        "them",
        "some",
        "while",
        "very",
        "near",
        "next",
        "by",
        "from",
        "into",
        "onto",
        "over",
        "under",
        "up",
        "down",
        "out",
        "as",
        "than",
        "then",
        "so",
        "just",
    ]
)


def keywords(references: Sequence[str]) -> set[str]:
    """Content words (not `STOPWORDS`) in at least two references (or in the only one)."""
    counts: Counter[str] = Counter()
    for ref in references:
        counts.update({w for w in tokenize_caption(ref) if w not in STOPWORDS})
    need = min(2, len(references))
    return {w for w, c in counts.items() if c >= need}


def keyword_reward(hypothesis: object, references: Sequence[str]) -> float:
    """F1 between the hypothesis' content words and the references' `keywords`, in [0, 1].

    Recall rewards naming what the references agree on; precision stops a list of every
    plausible word from paying.
    """
    target = keywords(references)
    said = {w for w in tokenize_caption(hypothesis) if w not in STOPWORDS}
    hits = len(target & said)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(said), hits / len(target)
    return 2 * precision * recall / (precision + recall)
