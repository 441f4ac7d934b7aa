"""The bench's spreads on synthetic timings: median / min / max of a series, the speedup's range,
the tie rule (overlapping [min, max] intervals are a tie whatever the ratio of the medians), the
run's noise from the matmul figure, and the markdown that shows them."""
import pytest

from vans_jax.apps import bench
from vans_jax.apps.bench import markdown_table


def stats(*times):
    return dict(bench.spread(times), warmup_s=1.0, device="cpu")


def test_spread_is_median_min_max_of_the_series():
    s = bench.spread([0.3, 0.1, 0.2, 0.5])
    assert s == dict(steady_s=0.25, min_s=0.1, max_s=0.5, times_s=[0.3, 0.1, 0.2, 0.5], repeats=4)
    assert bench.relative_spread(s) == pytest.approx((0.5 - 0.1) / 0.25)
    with pytest.raises(ValueError, match="no times"):
        bench.spread([])


@pytest.mark.parametrize("ours, ref, verdict", [
    ((1.0, 1.1, 1.2), (2.0, 2.1, 2.2), "faster"),     # our slowest beats their fastest
    ((2.0, 2.1, 2.2), (1.0, 1.1, 1.2), "slower"),
    ((1.0, 1.1, 1.5), (1.4, 1.6, 1.7), "tie"),        # medians 1.1 vs 1.6 (1.45x), but the intervals overlap
    ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), "tie"),        # touching counts as overlapping
    ((1.0, 1.2, 2.0), (1.1, 1.1, 1.1), "tie"),        # one interval inside the other
])
def test_overlapping_intervals_are_a_tie(ours, ref, verdict):
    c = bench.compare(stats(*ours), stats(*ref))
    assert c["verdict"] == verdict
    assert c["speedup"] == pytest.approx(ref[1] / ours[1])
    lo, hi = c["speedup_range"]
    assert lo == pytest.approx(min(ref) / max(ours)) and hi == pytest.approx(max(ref) / min(ours))
    assert lo <= c["speedup"] <= hi
    # the verdict is the range against 1: faster iff the whole range is above it, slower iff below
    assert (verdict == "faster") == (lo > 1) and (verdict == "slower") == (hi < 1)


def test_figure_carries_the_verdict_and_the_markdown_shows_it():
    tie = bench.figure("a", "s", "what", dict(n=1), "float32", stats(1.0, 1.1, 1.5), stats(1.4, 1.6, 1.7))
    fast = bench.figure("b", "s", "what", dict(n=1), "float32", stats(1.0, 1.1, 1.2), stats(2.0, 2.1, 2.2))
    alone = bench.figure("c", "s", "what", dict(n=1), "float32", stats(1.0, 1.1, 1.2), None, "no torch here")
    assert (tie["verdict"], fast["verdict"], alone["verdict"]) == ("tie", "faster", None)
    assert alone["speedup"] is None and alone["speedup_range"] is None
    with pytest.raises(ValueError, match="min_s <= steady_s <= max_s"):
        bench.compare(dict(steady_s=1.0, min_s=2.0, max_s=3.0), stats(1.0))
    result = dict(created="now", device="cpu", dtype="float32", repeats=3, reference_repeats=3,
                  reference=dict(device="torch cpu", reason=None), figures=[tie, fast, alone],
                  noise=bench.run_noise([bench.figure("matmul", "matmul", "mm", {}, "float32",
                                                      stats(1.0, 1.1, 1.2), stats(1.0, 2.0, 3.0))]))
    assert result["noise"]["ours"] == pytest.approx(0.2 / 1.1) and result["noise"]["reference"] == pytest.approx(1.0)
    table = markdown_table(result)
    assert "| a | n=1 | float32 | 1 | 1.1 [1-1.5] | 1.6 [1.4-1.7] | 1.45 [0.933-1.7] | tie |" in table
    assert "| b | n=1 | float32 | 1 | 1.1 [1-1.2] | 2.1 [2-2.2] | 1.91 [1.67-2.2] | faster |" in table
    assert "| c | n=1 | float32 | 1 | 1.1 [1-1.2] | - | - | - |" in table
    assert "Noise (matmul (max - min) / median): ours 18%, reference 100%" in table
    assert bench.run_noise([fast])["reason"] == "the matmul section did not run"
