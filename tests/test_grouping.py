"""Task skipping: every task evaluated exactly once per iteration, leaders inside their groups."""

from __future__ import annotations

import numpy as np
import pytest

from metarl.meta import group_sizes, make_groups


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


def test_leaders_uniform_within_group():
    rng = np.random.default_rng(7)
    counts = np.zeros(12)
    for _ in range(3000):
        for g in make_groups(12, 4, rng):
            counts[g.leader] += 1
    freq = counts / counts.sum()
    assert np.allclose(freq, 1 / 12, atol=0.01)


@pytest.mark.parametrize("k", [0, 13, -1])
def test_bad_skip_rejected(k):
    with pytest.raises(ValueError):
        make_groups(12, k, np.random.default_rng(0))
