"""The filter-distance metric (loft_hpc/metrics/filter_distance.py): input checks with their
messages, the stable ranking, the normaliser by hand, and the vectorised distance matrix against
the pairwise distance when ties sit in only some rows, single process (part of the
mutation-testing selection, ``make mutation``; the metric's values are tested against brute force
in tests/test_tools.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from loft_hpc.metrics import (chance_distance, distance_matrix, distance_to_reference, filter_distance,
                              rank_positions, ranking, reversed_distance)


def test_ranking_is_stable_on_many_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 3, 100).astype(float)          # 100 filters, three score values
    want = sorted(range(100), key=lambda f: (-s[f], f))  # larger first, ties by filter index
    assert ranking(s).tolist() == want
    pos = rank_positions(s)
    assert [int(pos[f]) for f in want] == list(range(1, 101))
    h = np.stack([s, s[::-1]])
    assert ranking(h)[1].tolist() == sorted(range(100), key=lambda f: (-s[99 - f], f))
    assert ranking([1, 3, 2]).tolist() == [1, 2, 0]    # a list of ints is accepted


@pytest.mark.parametrize("call, message", [
    (lambda: ranking(np.ones((2, 2, 2))), "scores: expected shape (C,) or (T, C), got (2, 2, 2)"),
    (lambda: ranking(np.ones((2, 0))), "scores: expected an array of shape (T, C) with C >= 1, got shape (2, 0)"),
    (lambda: ranking([]), "scores: empty score vector"),
    (lambda: ranking([1.0, np.nan]), "scores: scores contain NaN"),
    (lambda: ranking([[1.0, np.nan]]), "scores: scores contain NaN"),
    (lambda: filter_distance(np.ones((2, 2)), np.ones(2)), "ref_scores: expected a 1-D score vector, got shape (2, 2)"),
    (lambda: filter_distance(np.ones(2), [1.0, np.nan]), "snap_scores: scores contain NaN"),
    (lambda: filter_distance(np.ones(3), np.ones(4)), "ref_scores has 3 filters, snap_scores 4"),
    (lambda: distance_to_reference(np.ones((2, 3)), np.ones(4)), "reference has 4 filters, history rows have 3"),
    (lambda: distance_to_reference(np.ones((2, 3)), [np.nan] * 3), "ref: scores contain NaN"),
    (lambda: distance_to_reference(np.ones(3), np.ones(3)),
     "history: expected an array of shape (T, C) with C >= 1, got shape (3,)"),
    (lambda: distance_matrix([[0.0, np.nan]]), "history: scores contain NaN"),
    (lambda: reversed_distance(0), "number of filters must be >= 1, got 0"),
    (lambda: chance_distance(-1), "number of filters must be >= 1, got -1"),
])
def test_bad_input_messages(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value) == message


def test_reversed_distance_by_hand():
    assert reversed_distance(1) == 0.0
    assert reversed_distance(2) == pytest.approx(1.5 * math.log(2), rel=1e-12)       # sigma = (2, 1)
    assert reversed_distance(3) == pytest.approx(4 / 3 * math.log(3), rel=1e-12)     # sigma = (3, 2, 1)
    # sigma = (4, 3, 2, 1): ln 4 + (1/2) ln(3/2) + (1/3) ln(3/2) + (1/4) ln 4
    assert reversed_distance(4) == pytest.approx(1.25 * math.log(4) + (5 / 6) * math.log(1.5), rel=1e-12)


def test_one_filter_is_distance_zero():
    assert filter_distance([3.0], [1.0]) == 0.0
    assert filter_distance([3.0], [1.0], normalize=False) == 0.0
    assert distance_to_reference([[1.0], [2.0]], [5.0]).tolist() == [0.0, 0.0]
    assert chance_distance(1, normalize=False) == 0.0


def test_chance_distance_by_hand_for_two_filters():
    # C = 2: half the rankings are identical (0), half reversed (1.5 ln 2)
    assert chance_distance(2, normalize=False) == pytest.approx(0.75 * math.log(2), rel=1e-12)
    assert chance_distance(2) == pytest.approx(0.5, rel=1e-12)


def test_distance_matrix_with_ties_in_some_rows_only():
    # row 2 has a tie (and no other row does), row 3 is all tied: each row as the reference orders
    # its ties as the snapshot does; as a snapshot, as the reference does
    h = np.array([[4.0, 3.0, 2.0, 1.0],
                  [1.0, 2.0, 4.0, 3.0],
                  [2.0, 2.0, 1.0, 3.0],
                  [5.0, 5.0, 5.0, 5.0],
                  [0.5, 0.25, 1.0, 0.75]])
    d = distance_matrix(h)
    raw = distance_matrix(h, normalize=False)
    for a in range(5):
        for b in range(5):
            assert d[a, b] == pytest.approx(filter_distance(h[a], h[b]), abs=1e-12), (a, b)
            assert raw[a, b] == pytest.approx(filter_distance(h[a], h[b], normalize=False), abs=1e-12), (a, b)
    assert d[3].tolist() == [0.0] * 5 and d[:, 3].tolist() == [0.0] * 5   # all tied: agrees with everything
    # row 2 as reference against row 0: its tie (filters 0, 1) follows row 0 (0 before 1), so it
    # ranks the filters 3, 0, 1, 2; row 0 ranks them 4th, 1st, 2nd, 3rd: sigma = (4, 1, 2, 3)
    want = abs(0 - math.log(4)) + abs(math.log(2) - 0) / 2 + abs(math.log(3) - math.log(2)) / 3 \
        + abs(math.log(4) - math.log(3)) / 4
    assert raw[2, 0] == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(distance_to_reference(h, h[2]), d[2], atol=1e-12)
    np.testing.assert_allclose(distance_to_reference(h, h[2], normalize=False), raw[2], atol=1e-12)
