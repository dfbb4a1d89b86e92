"""The ticket detectors against their definitions, written out independently here (plain loops),
on histories where the answer is known by construction."""
from __future__ import annotations

import math

import numpy as np
import pytest

from loft_hpc.metrics.filter_distance import filter_distance
from loft_hpc.metrics.ticket_detection import TicketDetector, detect, detection_groups, hamming, keep_mask


def _fd_reference(hist: dict[str, np.ndarray], window: int) -> list[float]:
    """Window distance of LoFT's criterion by the definition: max over groups and over the W
    previous snapshots of F(reference = newest, compared = older)."""
    t = next(iter(hist.values())).shape[0]
    out = []
    for i in range(t):
        if i < window:
            out.append(math.nan)
            continue
        out.append(max(filter_distance(h[i], h[j]) for h in hist.values() for j in range(i - window, i)))
    return out


def _eb_reference(hist: dict[str, np.ndarray], window: int, ratio: float) -> list[float]:
    t = next(iter(hist.values())).shape[0]
    names = sorted(hist)
    masks = []
    for i in range(t):
        parts = []
        for n in names:
            c = hist[n].shape[1]
            k = max(1, round((1 - ratio) * c))
            order = sorted(range(c), key=lambda f: (-hist[n][i, f], f))
            parts.append([f in order[:k] for f in range(c)])
        masks.append(np.concatenate([np.array(p) for p in parts]))
    out = []
    for i in range(t):
        if i < window:
            out.append(math.nan)
            continue
        out.append(max(sum(a != b for a, b in zip(masks[i], masks[j])) / masks[i].size for j in range(i - window, i)))
    return out


def _settling_history(seed: int, t: int = 12, sizes=(8, 16)) -> dict[str, np.ndarray]:
    """Scores that move a lot at first and settle: a fixed target plus noise shrinking over time."""
    rng = np.random.default_rng(seed)
    out = {}
    for gi, c in enumerate(sizes):
        target = rng.permutation(c).astype(np.float64) + 1.0
        noise = rng.normal(size=(t, c))
        scale = (c / 2) * 0.5 ** np.arange(t)
        out[f"layer{gi}.conv1"] = (target[None, :] + scale[:, None] * noise).astype(np.float32)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("window", [1, 3])
def test_window_distances_match_the_definitions(seed, window):
    hist = _settling_history(seed)
    t = 12
    steps, epochs = list(range(0, 10 * t, 10)), [i * 0.5 for i in range(t)]
    fd = detect(steps, epochs, hist, criterion="filter_distance", window=window, threshold=0.05)
    eb = detect(steps, epochs, hist, criterion="early_bird", window=window, threshold=0.1, ratio=0.5)
    np.testing.assert_array_equal(np.isnan(fd.distance), np.arange(t) < window)
    np.testing.assert_allclose(np.nan_to_num(fd.distance, nan=-1), np.nan_to_num(_fd_reference(hist, window), nan=-1),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.nan_to_num(eb.distance, nan=-1),
                               np.nan_to_num(_eb_reference(hist, window, 0.5), nan=-1), rtol=0, atol=0)
    # emergence: the first snapshot whose window distance passes the threshold
    first_fd = next((i for i, d in enumerate(fd.distance) if not math.isnan(d) and d < 0.05), None)
    first_eb = next((i for i, d in enumerate(eb.distance) if not math.isnan(d) and d <= 0.1), None)
    assert fd.emerged_index == first_fd and eb.emerged_index == first_eb
    assert first_fd is not None and first_eb is not None  # the noise halves every snapshot: both settle
    assert fd.emerged_step == steps[first_fd] and fd.emerged_epoch == epochs[first_fd]


def test_threshold_comparisons_follow_each_criterion():
    """filter_distance: strictly below eps; early_bird: at most eps (their code returns False only
    when a distance exceeds 0.1)."""
    a = np.array([4.0, 3.0, 2.0, 1.0])   # mask at 50%: filters 0, 1 kept
    b = np.array([4.0, 1.0, 2.0, 3.0])   # kept 0, 3: two of four filters differ -> 0.5
    hist = {"g": np.stack([a, b])}
    eb = detect([0, 1], [0.0, 1.0], hist, criterion="early_bird", window=1, threshold=0.5, ratio=0.5)
    assert eb.distance[1] == 0.5 and eb.emerged_step == 1
    eb = detect([0, 1], [0.0, 1.0], hist, criterion="early_bird", window=1, threshold=0.4999, ratio=0.5)
    assert not eb.emerged and eb.emerged_step == -1 and math.isnan(eb.emerged_epoch)
    d = filter_distance(b, a)
    fd = detect([0, 1], [0.0, 1.0], hist, criterion="filter_distance", window=1, threshold=d)
    assert fd.distance[1] == d and not fd.emerged  # equal is not below
    fd = detect([0, 1], [0.0, 1.0], hist, criterion="filter_distance", window=1, threshold=d * (1 + 1e-9))
    assert fd.emerged_index == 1


def test_the_newest_snapshot_is_the_reference():
    """F is not symmetric: the newest ranking weighs its own top filters most."""
    old = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    new = np.array([4.0, 5.0, 3.0, 2.0, 1.0, 0.5])
    det = detect([0, 1], [0, 1], {"g": np.stack([old, new])}, criterion="filter_distance", window=1, threshold=1.0)
    assert det.distance[1] == filter_distance(new, old)


def test_only_the_first_detection_counts_and_the_window_slides():
    rng = np.random.default_rng(5)
    stable = rng.permutation(10).astype(np.float64)
    rows = [rng.permutation(10).astype(np.float64) for _ in range(3)] + [stable] * 4 + \
           [rng.permutation(10).astype(np.float64)] + [stable] * 4
    det = TicketDetector("filter_distance", window=2, threshold=1e-9)
    fired = [det.update(i, float(i), {"g": r}) for i, r in enumerate(rows)]
    # rows 3..6 equal: row 5 is the first whose two predecessors equal it
    assert fired.index(True) == 5 and sum(fired) == 1
    d = det.detection.distance
    assert d[5] == 0.0 and d[6] == 0.0 and d[7] > 0 and d[8] > 0 and d[9] > 0  # the outlier leaves the window after 2
    assert d[10] == 0.0 and det.detection.emerged_index == 5


def test_keep_mask_and_hamming_by_hand():
    s = np.array([0.1, 0.9, 0.5, 0.5, 0.2])
    np.testing.assert_array_equal(keep_mask(s, 0.6), [False, True, True, False, False])  # round(0.4*5)=2, tie -> lower index
    np.testing.assert_array_equal(keep_mask(s, 0.99), [False, True, False, False, False])  # at least one kept
    assert hamming(np.array([1, 0, 1, 0], bool), np.array([1, 1, 0, 0], bool)) == 0.5


def test_detection_groups_prefer_partitioned():
    class G:
        def __init__(self, name, partitioned):
            self.name, self.partitioned = name, partitioned
    assert detection_groups([G("a", False), G("b", True), G("c", True)]) == ["b", "c"]
    assert detection_groups([G("a", False), G("b", False)]) == ["a", "b"]


@pytest.mark.parametrize("bad", [dict(criterion="median"), dict(window=0), dict(ratio=1.0)])
def test_bad_parameters_are_refused(bad):
    kw = dict(criterion="filter_distance", window=2, threshold=0.1, ratio=0.5) | bad
    with pytest.raises(ValueError):
        TicketDetector(**kw)


def test_history_length_must_match_the_index():
    with pytest.raises(ValueError, match="snapshots"):
        detect([0, 1, 2], [0, 1, 2], {"g": np.zeros((2, 4))}, criterion="filter_distance", window=1, threshold=0.1)


def test_cadence_uses_the_first_snapshot_at_or_after_each_multiple():
    """every=21 with snapshots at LoFT round boundaries (K=5): 0, 25, 45, 65 are used (the first at
    or after 0, 21, 42, 63), the others skipped with a NaN distance; the result equals the detection
    on the used snapshots alone."""
    rng = np.random.default_rng(7)
    steps = [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70]
    hist = {"g": rng.normal(size=(len(steps), 12))}
    det = detect(steps, [s / 21 for s in steps], hist, criterion="early_bird", window=1, threshold=1.0, every=21)
    used = [0, 5, 9, 13]
    assert [i for i, d in enumerate(det.distance) if not math.isnan(d)] == used[1:]
    alone = detect([steps[i] for i in used], [steps[i] / 21 for i in used], {"g": hist["g"][used]},
                   criterion="early_bird", window=1, threshold=1.0)
    np.testing.assert_array_equal([det.distance[i] for i in used], alone.distance)  # NaN where NaN
    assert det.emerged_step == 25 and alone.emerged_step == 25
    with pytest.raises(ValueError):
        TicketDetector("filter_distance", 1, 0.1, every=-1)
