"""Task skipping: every task evaluated exactly once per iteration, leaders inside their groups."""

from __future__ import annotations

import numpy as np
import pytest

from metarl.core.meta import group_sizes, make_groups


@pytest.mark.parametrize("n,k", [(12, 1), (12, 2), (12, 3), (12, 4), (12, 6), (12, 12), (12, 5), (7, 3), (3, 2)])
def test_groups_cover_each_task_once(n, k):
    rng = np.random.default_rng(n * 100 + k)
    for _ in range(20):
        groups = make_groups(n, k, rng)
        members = [j for g in groups for j in g.members]
        assert sorted(members) == list(range(n))
        assert len(groups) == -(-n // k)
        assert [len(g.members) for g in groups] == group_sizes(n, k)
        assert all(g.leader in g.members for g in groups)
        assert all(len(g.members) == k for g in groups[:-1])


def test_skip_one_is_plain_fomaml():
    groups = make_groups(12, 1, np.random.default_rng(0))
    assert all(g.members == (g.leader,) for g in groups)
    assert sorted(g.leader for g in groups) == list(range(12))


def test_last_group_smaller_when_k_does_not_divide():
    assert group_sizes(12, 5) == [5, 5, 2]
    assert group_sizes(7, 3) == [3, 3, 1]


def test_grouping_is_random_and_seeded():
    a = [make_groups(12, 4, np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(0)
    seen_leaders = {tuple(sorted(g.leader for g in make_groups(12, 4, rng))) for _ in range(50)}
    assert len(seen_leaders) > 10  # leaders vary from iteration to iteration


def chi2_bound(df: int, p: float) -> float:
    """An x with P(chi2_df >= x) <= p, from the Chernoff bound P(chi2_df >= x) <= (x/df)^(df/2)
    exp(-(x - df)/2) (x > df), solved by bisection; no statistics package needed."""
    log_tail = lambda x: df / 2 * np.log(x / df) - (x - df) / 2  # noqa: E731
    lo, hi = float(df), float(df) + 10.0
    while log_tail(hi) > np.log(p):
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if log_tail(mid) > np.log(p) else (lo, mid)
    return hi


def test_chi2_bound_is_a_tail_bound():
    # closed forms: P(chi2_2 >= x) = exp(-x/2); the bound is conservative, never below the quantile
    assert -2 * np.log(1e-6) <= chi2_bound(2, 1e-6) < 2 * -2 * np.log(1e-6)
    assert 10 < chi2_bound(1, 0.01) < 20  # the 0.99 quantile of chi2_1 is 6.63


@pytest.mark.parametrize("n,k", [(12, 4), (7, 3)])
def test_leaders_uniform_within_group(n, k):
    """Given its group, each member is the leader with probability 1/size: the leader's position in
    the group's member tuple, and its rank among the group's task indices, are uniform. (A task's
    overall leader frequency cannot tell: the shuffle alone makes a fixed position 1/N.)"""
    rng = np.random.default_rng(7)
    draws = 2000
    position: dict[int, np.ndarray] = {}  # group size -> counts of the leader's index in g.members
    rank: dict[int, np.ndarray] = {}  # group size -> counts of the leader's rank in sorted(g.members)
    for _ in range(draws):
        for g in make_groups(n, k, rng):
            size = len(g.members)
            position.setdefault(size, np.zeros(size))[g.members.index(g.leader)] += 1
            rank.setdefault(size, np.zeros(size))[sorted(g.members).index(g.leader)] += 1
    assert set(position) == set(group_sizes(n, k))
    tests = 0
    for counts in [*position.values(), *rank.values()]:
        size = len(counts)
        if size == 1:
            continue
        # Pearson's statistic against the uniform law: chi-square with size - 1 degrees of freedom
        # under the null. The bound has tail probability <= 1e-6 (a false alarm at most once in a
        # million seeds; the seed is fixed, so the outcome is deterministic). A leader always at one
        # position gives (size - 1) x the draws, thousands here, against a bound of ~30.
        expected = counts.sum() / size
        stat = float(((counts - expected) ** 2 / expected).sum())
        assert stat < chi2_bound(size - 1, 1e-6), (n, k, size, counts)
        tests += 1
    assert tests == 2 * len({s for s in group_sizes(n, k) if s > 1})


@pytest.mark.parametrize("k", [0, 13, -1])
def test_bad_skip_rejected(k):
    with pytest.raises(ValueError):
        make_groups(12, k, np.random.default_rng(0))
