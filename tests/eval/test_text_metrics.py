"""BLEU / ROUGE-L on hand-computed examples (+ parity with nltk when it is installed)."""
import math

import numpy as np
import pytest

from vans_jax.eval import text_metrics as T


def test_tokenize():
    assert T.tokenize("The Cat, sat!  On the MAT.") == ["the", "cat", "sat", "on", "the", "mat"]
    assert T.tokenize("don't wear a t-shirt -- ok?") == ["don't", "wear", "a", "t-shirt", "ok"]


def test_bleu_hand_computed():
    # the cat sat on the mat / the cat is on the mat: p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3, BP = 1
    b = T.sentence_bleu("The cat sat on the mat.", "the cat is on the mat")
    assert b["bleu1"] == pytest.approx(5 / 6, rel=1e-9)
    assert b["bleu2"] == pytest.approx(math.sqrt(0.5), rel=1e-9)
    assert b["bleu3"] == pytest.approx(0.5, rel=1e-9)
    assert 0 <= b["bleu4"] < 1e-3                                   # no 4-gram match: ~0, no error
    # brevity penalty: c = 2, r = 4 -> exp(1 - 2) for every order
    b = T.sentence_bleu("the cat", "the cat is here")
    assert b["bleu1"] == pytest.approx(math.exp(-1), rel=1e-8)
    assert b["bleu2"] == pytest.approx(math.exp(-1), rel=1e-8)
    # clipping: "the" appears once in the reference
    assert T.sentence_bleu("the the the", "the cat")["bleu1"] == pytest.approx(1 / 3, rel=1e-9)


def test_bleu_multi_reference_and_closest_length():
    # closest reference length: |2-3| = 1 beats |5-3| = 2 -> r = 2 <= c, no penalty
    b = T.sentence_bleu("a b c", ["a b", "a b c d e"])
    assert b["bleu1"] == pytest.approx(1.0) and b["bleu2"] == pytest.approx(1.0)
    # a tie picks the shorter reference (2, not 4): still no penalty
    assert T.sentence_bleu("a b c", ["a b", "a b c d"])["bleu1"] == pytest.approx(1.0)
    b = T.sentence_bleu("a b", ["a b c d"])                           # only reference: r = 4 -> BP = e^-1
    assert b["bleu1"] == pytest.approx(math.exp(-1))


def test_bleu_is_corpus_level():
    hyps, refs = ["a b c", "d"], ["a b c", "x"]
    # corpus: p1 = 3/4; the mean of sentence scores would be (1 + 0) / 2
    assert T.corpus_bleu(hyps, refs)["bleu1"] == pytest.approx(0.75, rel=1e-9)
    mean_sent = np.mean([T.sentence_bleu(h, r)["bleu1"] for h, r in zip(hyps, refs)])
    assert mean_sent == pytest.approx(0.5, abs=1e-9)
    with pytest.raises(ValueError):
        T.corpus_bleu(["a"], [])


def test_bleu_matches_nltk_corpus_bleu():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    hyps = ["a man is riding a red bike down the street", "two dogs are playing in the snow together",
            "the ball rolls off the table and falls"]
    refs = [["a man rides a red bicycle down the street", "a person riding a bike on a street"],
            ["two dogs are playing in the snow"], ["the ball falls off the table onto the floor"]]
    ours = T.corpus_bleu(hyps, refs)
    toks_h = [T.tokenize(h) for h in hyps]
    toks_r = [[T.tokenize(r) for r in rs] for rs in refs]
    for n in range(1, 5):
        ref = nltk_bleu.corpus_bleu(toks_r, toks_h, weights=tuple([1 / n] * n))
        assert ours[f"bleu{n}"] == pytest.approx(ref, rel=1e-6), n


def test_rouge_l_and_caption_metrics():
    assert T.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # mean over samples; best of several references
    assert T.rouge_l(["a b c d", "x"], [["zzz", "a c"], "x"]) == pytest.approx((2 / 3 + 1) / 2)
    preds = ["[Think]the cat wants to sit[/Think][Ans]The cat sat on the mat.[/Ans]",
             "[Think]...[/Think][Ans]a dog runs[/Ans]"]
    refs = ["the cat is on the mat", "a dog runs"]
    m = T.caption_metrics(preds, refs)
    assert set(m) == {"bleu1", "bleu2", "bleu3", "bleu4", "rougeL"}
    assert m["rougeL"] == pytest.approx((5 / 6 + 1) / 2)
    # corpus counts: p1 = (5 + 3) / (6 + 3), p2 = (3 + 2) / (5 + 2)
    assert m["bleu1"] == pytest.approx(8 / 9, rel=1e-9)
    assert m["bleu2"] == pytest.approx(math.sqrt(8 / 9 * 5 / 7), rel=1e-9)
    raw = T.caption_metrics(preds, refs, extract=False)
    assert raw["bleu1"] < m["bleu1"]
