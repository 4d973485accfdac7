"""``llava_twist.eval.paired``: the paired difference of two models' right/wrong answers on the same questions,
checked against figures worked out by hand."""

from __future__ import annotations

import math

import pytest

from llava_twist.eval.paired import describe, mcnemar_exact, paired_difference


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair trials (symmetric: twice the smaller tail)."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


def test_mcnemar_counts_only_the_discordant_pairs() -> None:
    # 8 questions only the first model got right, 2 only the second: 2 * (1 + 10 + 45) / 1024
    assert mcnemar_exact(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024)
    assert mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(30, 10) == pytest.approx(binomial_two_sided(10, 40))


def test_paired_difference_on_a_hand_built_table() -> None:
    # 100 questions: 40 both right, 30 only a, 10 only b, 20 both wrong
    a = [True] * 40 + [True] * 30 + [False] * 10 + [False] * 20
    b = [True] * 40 + [False] * 30 + [True] * 10 + [False] * 20
    r = paired_difference(a, b, seed=0)
    assert (r["n"], r["only_a"], r["only_b"]) == (100, 30, 10)
    assert r["acc_a"] == pytest.approx(0.70) and r["acc_b"] == pytest.approx(0.50)
    assert r["difference"] == pytest.approx(0.20)
    assert r["mcnemar_p"] == pytest.approx(binomial_two_sided(10, 40))
    low, high = r["ci"]
    # the normal approximation of the paired difference: sd of d_i over sqrt(n), d in {1: 30, -1: 10, 0: 60}
    sd = math.sqrt((30 * 0.8**2 + 10 * 1.2**2 + 60 * 0.2**2) / 100) / math.sqrt(100)
    assert low == pytest.approx(0.20 - 1.96 * sd, abs=0.02) and high == pytest.approx(0.20 + 1.96 * sd, abs=0.02)
    assert paired_difference(a, b, seed=0) == r  # seeded: the same interval every time
    assert "+20.0 points (95% CI" in describe(r) and "n 100" in describe(r)


def test_a_balanced_table_has_an_interval_around_zero() -> None:
    a = [True] * 25 + [False] * 25 + [True] * 50
    b = [False] * 25 + [True] * 25 + [True] * 50
    r = paired_difference(a, b)
    assert r["difference"] == 0 and r["ci"][0] < 0 < r["ci"][1] and r["mcnemar_p"] == pytest.approx(1.0)


def test_identical_answers_give_a_point_interval() -> None:
    r = paired_difference([True, False, True], [True, False, True])
    assert r["ci"] == [0.0, 0.0] and r["mcnemar_p"] == 1.0


def test_unpaired_input_is_refused() -> None:
    with pytest.raises(ValueError, match="same questions"):
        paired_difference([True], [True, False])
    with pytest.raises(ValueError, match="no questions"):
        paired_difference([], [])
