"""Caption metrics as the COCO caption evaluation computes them (``pycocoevalcap``'s ``Bleu(4)`` with its default
"closest" reference length, and ``Cider`` = CIDEr-D with sigma 6, clipped tf-idf, x10), written here so the zoo does
not depend on that 100 MB package; ``tests/tasks/test_caption_metrics.py`` pins our numbers to values it produced.

One difference on purpose: the COCO evaluation tokenizes with the Stanford PTB tokenizer (Java). :func:`tokenize`
lower-cases and keeps runs of letters / digits / apostrophes, which splits the same way on plain captions (no
Java needed). Scores on the same token lists are identical.

``bleu4(candidates, references)`` and ``cider_d(candidates, references)`` take ``candidates: list[str]`` (one per
image) and ``references: list[list[str]]`` (the human captions of each image) and return corpus scores (BLEU-4 in
[0, 1]; CIDEr-D usually in [0, ~3], reported as computed, the COCO convention).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9']+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words (letters, digits, apostrophes); punctuation dropped."""
    return _WORD.findall(text.lower())


def _ngrams(words: Sequence[str], n_max: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidate captions for {len(references)} reference lists; give one "
                         "candidate per image")
    if not candidates:
        raise ValueError("no captions to score")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"image(s) {empty[:5]} have no reference caption")


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4: clipped n-gram matches summed over the corpus, geometric mean of the four precisions, brevity
    penalty from each candidate's closest reference length (ties: the shorter), COCO's 1e-15 / 1e-9 smoothing."""
    _check(candidates, references)
    correct, guess = [0] * 4, [0] * 4
    test_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        words = tokenize(cand)
        ref_words = [tokenize(r) for r in refs]
        max_ref: Counter = Counter()
        for rw in ref_words:
            for gram, c in _ngrams(rw, 4).items():
                max_ref[gram] = max(max_ref[gram], c)
        for gram, c in _ngrams(words, 4).items():
            correct[len(gram) - 1] += min(c, max_ref[gram])
        for n in range(4):
            guess[n] += max(len(words) - n, 0)
        test_len += len(words)
        ref_len += min((abs(len(rw) - len(words)), len(rw)) for rw in ref_words)[1]
    tiny, small = 1e-15, 1e-9
    precision = 1.0
    for n in range(4):
        precision *= (correct[n] + tiny) / (guess[n] + small)
    score = precision ** 0.25
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)
    return score


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """CIDEr-D: per n in 1..4, tf-idf vectors (document frequency = number of IMAGES whose references hold the
    n-gram, idf = log(#images) - log(df)); the candidate's weights are clipped to the reference's, cosine-like
    normalised, damped by a Gaussian of the bigram-count difference; mean over n and references, x10, mean over
    images."""
    _check(candidates, references)
    ref_counts = [[_ngrams(tokenize(r), 4) for r in refs] for refs in references]
    df: Counter = Counter()
    for counts in ref_counts:
        df.update(set().union(*(c.keys() for c in counts)))
    log_images = math.log(float(len(references)))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(4)]
        norm = [0.0] * 4
        for gram, tf in counts.items():
            n = len(gram) - 1
            w = float(tf) * (log_images - math.log(max(1.0, df[gram])))
            vec[n][gram] = w
            norm[n] += w * w
        bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in norm], bigrams

    total = 0.0
    for cand, counts in zip(candidates, ref_counts):
        v_c, n_c, len_c = vector(_ngrams(tokenize(cand), 4))
        score = [0.0] * 4
        for ref in counts:
            v_r, n_r, len_r = vector(ref)
            damp = math.exp(-((len_c - len_r) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                val = sum(min(w, v_r[n].get(g, 0.0)) * v_r[n].get(g, 0.0) for g, w in v_c[n].items())
                if n_c[n] != 0 and n_r[n] != 0:
                    val /= n_c[n] * n_r[n]
                score[n] += val * damp
        total += sum(score) / 4 / len(counts) * 10.0
    return total / len(candidates)
