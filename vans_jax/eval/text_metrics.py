"""Caption metrics on the [Ans] text: BLEU@1..4 and ROUGE-L.

BLEU convention (that of the COCO caption evaluation, ``pycocoevalcap``'s ``Bleu(4)``, the usual
one for captioning papers):

* **corpus-level**: clipped n-gram matches and hypothesis n-gram counts are summed over the whole
  corpus before dividing (not an average of sentence scores);
* **brevity penalty** over the corpus: hypothesis length c = total hypothesis tokens, reference
  length r = sum over samples of the reference length closest to that hypothesis (ties -> the
  shorter), BP = exp(1 - r / c) if c < r else 1;
* BLEU@n = BP * (p_1 * ... * p_n) ^ (1 / n) (uniform weights, geometric mean);
* **no smoothing**, except COCO's guards: p_k = (matches + 1e-15) / (count + 1e-9) and
  c / r = (c + 1e-15) / (r + 1e-9). So a corpus with no 4-gram match scores ~0 rather than an
  error. When every order has a match this equals ``nltk.translate.bleu_score.corpus_bleu``
  without smoothing to ~1e-9.
* **multiple references** per sample: clipped counts take the max count over references.
* **tokenization**: COCO runs the Stanford PTB tokenizer (Java) and drops punctuation tokens;
  here a pure-Python approximation: lowercase, tokens are runs of letters/digits (Unicode aware)
  that may be joined by an apostrophe or a hyphen ("don't", "t-shirt" stay one token), all other
  characters (punctuation, symbols) are dropped. Pass ``tokenize=`` to use another one.

ROUGE-L: ``rouge_score`` (sentence-level LCS F-measure, beta = 1, its own tokenizer: lowercase,
[a-z0-9] runs; no stemming by default) averaged over samples; with several references per sample
the best one counts (``score_multi``).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Sequence

import numpy as np

from vans_jax.rl.format import ANS_OPEN, extract_answer
from vans_jax.rl.rewards import _rouge_scorer

_TOKEN_RE = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")
TINY, SMALL = 1e-15, 1e-9


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens, punctuation dropped (see the module docstring)."""
    return _TOKEN_RE.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _as_ref_lists(refs) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in refs]


def bleu_stats(hyp: list[str], refs: list[list[str]], max_n: int = 4):
    """(hyp_len, closest_ref_len, matches[n], totals[n]) for one tokenized sample."""
    matches, totals = [0] * max_n, [0] * max_n
    for n in range(1, max_n + 1):
        h = _ngrams(hyp, n)
        max_ref = Counter()
        for r in refs:
            for g, c in _ngrams(r, n).items():
                max_ref[g] = max(max_ref[g], c)
        matches[n - 1] = sum(min(c, max_ref[g]) for g, c in h.items())
        totals[n - 1] = max(len(hyp) - n + 1, 0)
    ref_len = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    return len(hyp), ref_len, matches, totals


def _bleu_from_stats(hyp_len, ref_len, matches, totals, max_n):
    out = {}
    log_p = 0.0
    ratio = (hyp_len + TINY) / (ref_len + SMALL)
    bp = 1.0 if ratio >= 1 else math.exp(1 - 1 / ratio)
    for n in range(1, max_n + 1):
        log_p += math.log((matches[n - 1] + TINY) / (totals[n - 1] + SMALL))
        out[f"bleu{n}"] = bp * math.exp(log_p / n)
    return out


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str | Sequence[str]], max_n: int = 4,
                tokenize: Callable[[str], list[str]] = tokenize) -> dict[str, float]:
    """{"bleu1": ..., ..., "bleu{max_n}": ...} over the corpus (see the module docstring).
    ``refs[i]`` is one reference string or a list of them."""
    refs = _as_ref_lists(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("empty corpus")
    c = r = 0
    m, t = [0] * max_n, [0] * max_n
    for h, rs in zip(hyps, refs):
        if not rs:
            raise ValueError("a sample has no reference")
        hl, rl, mm, tt = bleu_stats(tokenize(h), [tokenize(x) for x in rs], max_n)
        c, r = c + hl, r + rl
        m = [a + b for a, b in zip(m, mm)]
        t = [a + b for a, b in zip(t, tt)]
    return _bleu_from_stats(c, r, m, t, max_n)


def sentence_bleu(hyp: str, refs: str | Sequence[str], max_n: int = 4,
                  tokenize: Callable[[str], list[str]] = tokenize) -> dict[str, float]:
    """The same statistics for a single sample (no smoothing beyond the COCO guards)."""
    return corpus_bleu([hyp], [refs], max_n, tokenize)


def rouge_l(hyps: Sequence[str], refs: Sequence[str | Sequence[str]], use_stemmer: bool = False) -> float:
    """Mean ROUGE-L F-measure (rouge_score) over samples; best reference per sample."""
    refs = _as_ref_lists(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("empty corpus")
    scorer = _rouge_scorer(bool(use_stemmer))
    return float(np.mean([scorer.score_multi(rs, h)["rougeL"].fmeasure for h, rs in zip(hyps, refs)]))


def caption_metrics(preds: Sequence[str], refs: Sequence[str | Sequence[str]], *, extract: bool = True,
                    use_stemmer: bool = False) -> dict[str, float]:
    """BLEU@1..4 (corpus) and ROUGE-L (mean) of the predictions' [Ans] text vs the references.
    With ``extract``, ``extract_answer`` is applied to every prediction and to references that
    carry an [Ans] tag."""
    if extract:
        preds = [extract_answer(p) for p in preds]
        refs = [[extract_answer(x) if ANS_OPEN in x else x for x in rs] for rs in _as_ref_lists(refs)]
    out = corpus_bleu(preds, refs)
    out["rougeL"] = rouge_l(preds, refs, use_stemmer=use_stemmer)
    return out
