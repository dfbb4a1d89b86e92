"""Finding tickets: structured and unstructured masks, IMP, rewinding, retraining with masks."""
from __future__ import annotations

import functools
import hashlib
import shutil

import pytest
import torch

from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.config.schema import ModelConfig
from loft_hpc.models import build_model
from loft_hpc.partition.slicing import TensorSlicer, subnetwork
from loft_hpc.prune.masks import MaskError, apply_masks_, sparsity_report, validate_masks
from loft_hpc.prune.structured import channel_keep, channels_alive, global_scores, masks_from_channels
from loft_hpc.prune.unstructured import lth_pruned_fraction, magnitude_masks
from tests.mpi_util import REPO, TINY, assert_same_run, ok, run_job


def small(arch="preresnet18", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, width=kw.pop("width", 8), **kw)
    return build_model(cfg, num_classes=10, in_channels=3, image_size=16, dataset="synthetic")


def scores(state, g):
    w = state[g.producer].reshape(g.size, -1)
    return (w * w).sum(1)


@functools.lru_cache(maxsize=2)
def preresnet34x2(seed=0):
    """The paper's CIFAR model: PreResNet-34, inner width x2, width 64, 32 px (shared: never modify it)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="preresnet34", width=64, inner_width_factor=2)
    return build_model(cfg, num_classes=10, in_channels=3, image_size=32, dataset="cifar10")


def pruned_fractions(keep):
    return {g: 1 - k.float().mean().item() for g, k in keep.items()}


@pytest.mark.parametrize("p", [0.3, 0.5, 0.8])
def test_structured_layerwise_keeps_largest_filters(p):
    model = small(inner_width_factor=2)
    groups = model.filter_groups()
    state = model.state_dict()
    keep = channel_keep(state, groups, 1 - p, score="l2", scope="layerwise")
    for g in groups:
        k = keep[g.name]
        assert int(k.sum()) == max(1, round((1 - p) * g.size))
        s = scores(state, g)
        assert s[k].min() >= s[~k].max()  # the threshold separates kept from pruned


def test_structured_mask_equals_smaller_network():
    """Zeroing a group's pruned channels through the mask computes exactly what the sliced
    network of the kept channels computes."""
    model = small(inner_width_factor=2).double().eval()
    groups = [g for g in model.filter_groups() if g.partitioned]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    keep = channel_keep(model.state_dict(), groups, 0.5, score="l2", scope="layerwise")
    masks = masks_from_channels(model, groups, keep)
    validate_masks(masks, model)
    sub = subnetwork(model, TensorSlicer(groups), {g: torch.nonzero(k).reshape(-1) for g, k in keep.items()})
    masked = small(inner_width_factor=2).double().eval()
    masked.load_state_dict(model.state_dict())
    apply_masks_(masked, masks)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(masked(x), sub(x))
    # BN running statistics are buffers and are never masked
    assert all(n in dict(model.named_parameters()) for n in masks)


def test_structured_global_and_levels_only_shrink():
    model = small(inner_width_factor=2)
    groups = model.filter_groups()
    state = model.state_dict()
    prev = None
    for level in (1, 2, 3):
        keep_fraction = 0.2 ** (level / 3)
        alive = channels_alive(prev, groups) if prev else None
        keep = channel_keep(state, groups, keep_fraction, score="l2", scope="global", alive=alive)
        masks = masks_from_channels(model, groups, keep)
        validate_masks(masks, model, previous=prev)
        assert all(keep[g.name].any() for g in groups)  # never a whole layer
        total = sum(g.size for g in groups)
        kept = sum(int(k.sum()) for k in keep.values())
        assert abs(kept / total - keep_fraction) < 0.05
        prev = masks
    # global: one threshold on the comparable scores of the last level's survivors, and within
    # every group the kept filters are its largest by the raw score
    z = global_scores(state, groups, score="l2", alive=alive)
    kept_min = min(z[g][keep[g]].min() for g in keep if keep[g].sum() > 1)
    pruned = [z[g][~keep[g] & alive[g]] for g in keep if (~keep[g] & alive[g]).any()]
    assert kept_min >= max(p.max() for p in pruned)
    for g in groups:
        s, k, a = scores(state, g), keep[g.name], alive[g.name]
        if (a & ~k).any():
            assert s[k].min() >= s[a & ~k].max()


@pytest.mark.parametrize("score", ["l2", "l1"])
@pytest.mark.parametrize("p", [0.5, 0.8])
def test_structured_global_prunes_every_layer_alike_at_init(p, score):
    """At initialisation no layer is more important than another: every group loses p, within 10
    points. (Scores divided by fan-in pruned PreResNet-34 x2 at p = 0.5 as: stage 2 0%, stage 3
    23-27%, stage 4 99.9%; scores over the layer mean gave 71-87% at p = 0.8.)"""
    for model in (preresnet34x2(0), preresnet34x2(1), small(inner_width_factor=2)):
        groups = [g for g in model.filter_groups() if g.partitioned]
        assert len({model.state_dict()[g.producer][0].numel() for g in groups}) == 3  # three fan-ins
        keep = channel_keep(model.state_dict(), groups, 1 - p, score=score, scope="global")
        frac = pruned_fractions(keep)
        assert all(abs(f - p) <= 0.10 for f in frac.values()), frac
        total = sum(g.size for g in groups)
        assert abs(sum(int(k.sum()) for k in keep.values()) / total - (1 - p)) < 0.005


@pytest.mark.parametrize("score", ["l2", "l1"])
@pytest.mark.parametrize("p", [0.5, 0.8])
def test_structured_global_prunes_a_scaled_down_layer_most(p, score):
    """A layer whose weights are all x0.1 (the same network otherwise, at initialisation) is
    pruned most: global scores see a layer's scale, not only each filter's standing in it."""
    for model, scaled in ((preresnet34x2(), "layer3.2.inner"), (preresnet34x2(), "layer2.1.inner"),
                          (preresnet34x2(), "layer4.1.inner"), (small(inner_width_factor=2), "layer3.1.inner")):
        groups = [g for g in model.filter_groups() if g.partitioned]
        state = dict(model.state_dict())
        producer = next(g.producer for g in groups if g.name == scaled)
        state[producer] = state[producer] * 0.1
        frac = pruned_fractions(channel_keep(state, groups, 1 - p, score=score, scope="global"))
        others = [f for g, f in frac.items() if g != scaled]
        assert frac[scaled] > max(others) and frac[scaled] > p, (scaled, frac)
    # multiplying every weight by one factor changes nothing
    model = small(inner_width_factor=2)
    groups = [g for g in model.filter_groups() if g.partitioned]
    state = model.state_dict()
    a = channel_keep(state, groups, 1 - p, score=score, scope="global")
    b = channel_keep({n: t * 7.0 for n, t in state.items()}, groups, 1 - p, score=score, scope="global")
    assert all(torch.equal(a[g], b[g]) for g in a)


def lth_model(arch):
    """An LTH model at the LTH paper's size: Conv-2/4/6 on CIFAR-10, LeNet-300-100 on MNIST."""
    torch.manual_seed(0)
    lenet = arch == "lenet300_100"
    return build_model(ModelConfig(arch=arch, width=64), num_classes=10, in_channels=1 if lenet else 3,
                       image_size=28 if lenet else 32, dataset="synthetic")


def kept_counts(masks):
    return {n: int(m.sum()) for n, m in masks.items()}


def test_unstructured_lth_rates_compound_conv2_after_five_rounds():
    """LTH's Conv-2 (conv 10%, fc 20% per round) after 5 rounds: conv layers keep 0.9^5 = 59.049%,
    fc layers 0.8^5 = 32.768% of their weights, one-shot and as 5 IMP levels."""
    model = lth_model("conv2")
    names = model.prunable_weights()
    kinds = {n: model.layer_kind(n) for n in names}
    state = model.state_dict()
    sizes = {n: state[n].numel() for n in names}
    # by hand: 3x3 convs 3->64, 64->64; fc 64*16*16 -> 256 -> 256 -> 10
    assert sizes == {"conv1.weight": 1728, "conv2.weight": 36864, "fc1.weight": 4194304, "fc2.weight": 65536,
                     "classifier.weight": 2560}
    want = {"conv1.weight": 1020, "conv2.weight": 21768,                       # round(N x 0.59049)
            "fc1.weight": 1374390, "fc2.weight": 21475, "classifier.weight": 839}  # round(N x 0.32768)
    kept_exact = 0.59049 * (1728 + 36864) + 0.32768 * (4194304 + 65536 + 2560)
    p5 = 1 - kept_exact / 4300992                                              # 0.669962
    assert p5 == pytest.approx(0.669962, abs=1e-6)
    assert lth_pruned_fraction(state, names, kinds, 5, conv_rate=0.1, fc_rate=0.2) == pytest.approx(p5, abs=1e-12)

    one_shot = magnitude_masks(state, names, kinds, p5, scope="layerwise", conv_rate=0.1, fc_rate=0.2)
    assert kept_counts(one_shot) == want
    for n in names:  # within a layer: the largest magnitudes
        w = state[n].abs()
        assert w[one_shot[n]].min() >= w[~one_shot[n]].max()

    # IMP: 5 levels on the ticket stage's schedule, level k keeps (1 - p5)^(k/5); other weights each level
    prev = None
    for level in range(1, 6):
        weights = {n: torch.randn_like(t) for n, t in state.items()}
        masks = magnitude_masks(weights, names, kinds, 1 - (1 - p5) ** (level / 5), scope="layerwise",
                                conv_rate=0.1, fc_rate=0.2, previous=prev)
        validate_masks(masks, model, previous=prev)
        for n in names:  # level k is LTH's round k: conv keeps 0.9^k, fc 0.8^k (within 0.3 points)
            rate = 0.1 if kinds[n] == "conv" else 0.2
            assert abs(int(masks[n].sum()) / sizes[n] - (1 - rate) ** level) < 0.003, (level, n)
        prev = masks
    assert kept_counts(prev) == want


def test_unstructured_lth_rates_lenet_fc_20_percent_per_round():
    """LeNet-300-100, fc 20% per round: after 3 rounds every layer keeps 0.8^3 = 51.2%. The model
    has no conv layer, so conv_rate must not matter."""
    model = lth_model("lenet300_100")
    names = model.prunable_weights()
    kinds = {n: model.layer_kind(n) for n in names}
    state = model.state_dict()
    assert {n: state[n].numel() for n in names} == {"fc1.weight": 235200, "fc2.weight": 30000, "classifier.weight": 1000}
    want = {"fc1.weight": 120422, "fc2.weight": 15360, "classifier.weight": 512}  # round(N x 0.512)
    p3 = 1 - 0.8 ** 3
    for conv_rate in (0.1, 0.2, 0.0):
        masks = magnitude_masks(state, names, kinds, p3, scope="layerwise", conv_rate=conv_rate, fc_rate=0.2)
        assert kept_counts(masks) == want, conv_rate
    # two IMP levels of 1.5 rounds each reach the same ticket
    prev = None
    for level in (1, 2):
        prev = magnitude_masks({n: torch.randn_like(t) for n, t in state.items()}, names, kinds,
                               1 - (1 - p3) ** (level / 2), scope="layerwise", conv_rate=0.1, fc_rate=0.2, previous=prev)
        assert all(abs(int(m.sum()) / m.numel() - 0.8 ** (1.5 * level)) < 0.002 for m in prev.values())
    assert kept_counts(prev) == want


def test_unstructured_rate_zero_layers_are_not_pruned():
    """fc_rate 0 (the LTH ResNet-18 / VGG-19 setting): fc layers get no mask and the ratio is that of
    the conv layers, which then all share one rate; conv_rate 0: only fc layers are pruned."""
    model = small("conv4", width=16)
    names = model.prunable_weights()
    kinds = {n: model.layer_kind(n) for n in names}
    state = model.state_dict()
    masks = magnitude_masks(state, names, kinds, 0.6, scope="layerwise", conv_rate=0.2, fc_rate=0.0)
    assert set(masks) == {n for n in names if kinds[n] == "conv"}
    for n, m in masks.items():
        assert abs(1 - m.float().mean().item() - 0.6) < 0.002, n
    masks = magnitude_masks(state, names, kinds, 0.6, scope="layerwise", conv_rate=0.0, fc_rate=0.2)
    assert set(masks) == {n for n in names if kinds[n] == "fc"}
    with pytest.raises(ValueError, match="nothing to prune"):
        magnitude_masks(state, names, kinds, 0.6, scope="layerwise", conv_rate=0.0, fc_rate=0.0)


def test_unstructured_global_single_threshold_and_shrinking():
    model = small("conv2", width=16)
    names = model.prunable_weights()
    kinds = {n: model.layer_kind(n) for n in names}
    state = model.state_dict()
    m1 = magnitude_masks(state, names, kinds, 0.5, scope="global", conv_rate=0.2, fc_rate=0.2)
    allw = torch.cat([state[n].abs().reshape(-1) for n in names])
    allm = torch.cat([m1[n].reshape(-1) for n in names])
    assert abs(1 - allm.float().mean().item() - 0.5) < 0.01
    assert allw[allm].min() >= allw[~allm].max()
    # next level from other weights: survivors only shrink
    state2 = {n: torch.randn_like(t) for n, t in state.items()}
    m2 = magnitude_masks(state2, names, kinds, 0.75, scope="global", conv_rate=0.2, fc_rate=0.2, previous=m1)
    validate_masks(m2, model, previous=m1)


def test_validate_masks_rejects_bad_masks():
    model = small()
    w = "layer2.1.conv1.weight"
    p = dict(model.named_parameters())[w]
    with pytest.raises(MaskError, match="names no parameter"):
        validate_masks({"nope": torch.ones(1)}, model)
    with pytest.raises(MaskError, match="has shape"):
        validate_masks({w: torch.ones(3)}, model)
    with pytest.raises(MaskError, match="other than 0 and 1"):
        validate_masks({w: torch.full(p.shape, 2.0)}, model)
    prev = {w: torch.zeros(p.shape, dtype=torch.bool)}
    with pytest.raises(MaskError, match="revives"):
        validate_masks({w: torch.ones(p.shape, dtype=torch.bool)}, model, previous=prev)
    with pytest.raises(MaskError, match="missing"):
        validate_masks({}, model, previous=prev)
    table, overall = sparsity_report({w: torch.zeros(p.shape, dtype=torch.bool)}, model)
    assert overall == 1.0 and w in table


# ---------------------------------------------------------------- the stages end to end
# Weight snapshots at 8 and 16 steps: a ticket can rank its filters by one and start from the
# other, so a test tells which weights ranked (prune.mask_from) from which seeded it (prune.rewind).
PIPE = TINY + ["train.duration=24it", "train.local_steps=4", "train.eval_every=12it", "output.checkpoint_every=12it",
               "output.snapshot_every=4it", "output.snapshot_weights=[8it, 16it]", "retrain.duration=12it",
               "retrain.lr=0.05", "train.check_sync=true"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A LoFT-2 pretraining folder; tests copy it (copy_run) and never write here."""
    out = tmp_path_factory.mktemp("pipe")
    ok(run_job(2, ["--stage", "pretrain", *PIPE, f"output.dir={out}"]))
    return out


@pytest.fixture(scope="module")
def structured_p50(pretrained, tmp_path_factory):
    """A copy of ``pretrained`` with the structured p50 ticket found and retrained on 2 ranks:
    (folder, the job's stdout); tests copy the folder and never write here."""
    out = copy_run(pretrained, tmp_path_factory.mktemp("p50") / "run")
    p = ok(run_job(2, ["--stage", "prune,retrain", *PIPE, "prune.ratios=[0.5]", f"output.dir={out}"]))
    return out, p.stdout


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ckpt"))
    return dst


def digests(folder) -> dict[str, str]:
    return {str(q.relative_to(folder)): hashlib.sha256(q.read_bytes()).hexdigest()
            for q in sorted(folder.rglob("*")) if q.is_file()}


@functools.lru_cache(maxsize=1)
def pipe_groups():
    """The partitioned filter groups of the PIPE model (built, not trained: only names and sizes)."""
    from loft_hpc.config import load_config
    from loft_hpc.data import build_datasets
    from loft_hpc.stages.common import make_model

    cfg = load_config(REPO / "configs" / "default.yaml", PIPE)
    return tuple(g for g in make_model(cfg, build_datasets(cfg.data)).filter_groups() if g.partitioned)


def kept_filters(masks: dict, g) -> torch.Tensor:
    """The filters of group g a structured mask keeps: its producer's rows, each all kept or all pruned."""
    rows = masks[g.producer].reshape(g.size, -1)
    assert torch.equal(rows.all(1), rows.any(1)), f"{g.producer}: a filter is partly pruned"
    return rows.all(1)


def l2_scores(weights: dict, g) -> torch.Tensor:
    w = weights[g.producer].reshape(g.size, -1).double()
    return (w * w).sum(1)


def test_structured_ticket_retrained_with_mask_exactly_zero(structured_p50):
    out, stdout = structured_p50
    ticket = read_run_file(out / "tickets_p50.h5")
    pre = read_run_file(out / "pretrain.h5")
    for n, m in ticket.masks.items():  # rewind=end: the pretrained weights, masked
        assert torch.equal(ticket.model[n], pre.model[n] * m)
    rf = read_run_file(out / "retrain_p50.h5")
    assert rf.masks.keys() == ticket.masks.keys() and rf.metrics
    for n, m in rf.masks.items():
        assert torch.count_nonzero(rf.model[n][~m]) == 0, f"pruned weights of {n} moved"
        assert not torch.equal(rf.model[n][m], ticket.model[n][m]), f"{n} did not train"
    # sparsity counted from the masks themselves, and the file's /sparsity table agrees with them
    kept = sum(int(m.sum()) for m in rf.masks.values())
    total = sum(m.numel() for m in rf.masks.values())
    assert abs(1 - kept / total - 0.5) < 0.02
    assert {r["name"]: (r["kept"], r["total"]) for r in rf.sparsity} == \
        {n: (int(m.sum()), m.numel()) for n, m in rf.masks.items()}
    # the job's sparsity report: its overall line counts what the ticket's masks keep
    overall = next(ln for ln in stdout.splitlines() if "overall (masked tensors)" in ln)
    t_kept = sum(int(m.sum()) for m in ticket.masks.values())
    assert f"kept {t_kept:>10,} / {total:>10,}  pruned {1 - t_kept / total:6.1%}" in overall, overall


def test_imp_rewind_init_unstructured(pretrained, tmp_path):
    """IMP, 2 levels, rewound to theta_0 and ranked by the end of pretraining: level 1's masks are
    the largest magnitudes of the pretrained weights (not of theta_0), level 2's those of the level-1
    ticket retrained, among its survivors; the ticket holds theta_0 masked."""
    out = copy_run(pretrained, tmp_path / "imp")
    args = [*PIPE, "prune.method=unstructured", "prune.scope=global", "prune.levels=2", "prune.rewind=init",
            "prune.ratios=[0.75]", "retrain.duration=6it"]
    ok(run_job(0, ["--stage", "prune", *args, f"output.dir={out}"]))
    t = read_run_file(out / "tickets_p75.h5")
    pre = read_run_file(out / "pretrain.h5")
    assert t.mask_attrs["levels"] == 2 and (out / "imp" / "tickets_p75_level1.h5").is_file()
    lvl1 = read_run_file(out / "imp" / "tickets_p75_level1.h5")
    validate = sum(int(m.sum()) for m in lvl1.masks.values()) / sum(m.numel() for m in lvl1.masks.values())
    assert abs(validate - 0.5) < 0.02  # level 1 of 2 keeps (1-0.75)^(1/2) = 50%
    frac = sum(int(m.sum()) for m in t.masks.values()) / sum(m.numel() for m in t.masks.values())
    assert abs(frac - 0.25) < 0.02
    for n, m in t.masks.items():
        assert not (m & ~lvl1.masks[n]).any()  # only shrinks
        assert torch.equal(t.model[n], pre.init[n] * m)  # rewound to theta_0

    def separates(weights, keep, among=None) -> bool:
        """One global magnitude threshold of ``weights`` splits kept from pruned (among ``among``)."""
        names = sorted(keep)
        w = torch.cat([weights[n].abs().reshape(-1) for n in names])
        k = torch.cat([keep[n].reshape(-1) for n in names])
        a = torch.cat([among[n].reshape(-1) for n in names]) if among else torch.ones_like(k)
        return bool(w[k].min() >= w[a & ~k].max())

    assert separates(pre.model, lvl1.masks), "level 1 is not ranked by the end of pretraining"
    assert not separates(pre.init, lvl1.masks), "theta_0 ranks like the end of pretraining: cannot tell them apart"
    assert separates(lvl1.model, t.masks, among=lvl1.masks), "level 2 is not ranked by the retrained level 1"
    assert not separates(pre.model, t.masks, among=lvl1.masks), "level 2 ranks like level 1: cannot tell them apart"


def test_rewind_to_step_and_snapshot_ticket_ranked_and_seeded_apart(pretrained, tmp_path):
    """prune.mask_from=8it ranks the filters, prune.rewind=16it seeds the ticket: every group keeps
    the top half of its filters by the squared L2 norm of the step-8 weights, and the ticket holds the
    step-16 weights, masked. The step-16 weights rank some group differently, so swapping the two
    points fails this test."""
    out = copy_run(pretrained, tmp_path / "snap")
    args = [*PIPE, "prune.rewind=16it", "prune.mask_from=8it", "prune.ratios=[0.5]"]
    ok(run_job(0, ["--stage", "prune", *args, f"output.dir={out}"]))
    t = read_run_file(out / "tickets@8it_p50.h5")
    at8 = read_run_file(out / "snapshots" / "weights@8it.h5")
    at16 = read_run_file(out / "snapshots" / "weights@16it.h5")
    assert (at8.progress["step"], at16.progress["step"]) == (8, 16)
    assert t.mask_attrs["mask_from"] == "8it" and t.mask_attrs["mask_from_step"] == 8
    assert t.mask_attrs["rewind"] == "16it" and t.mask_attrs["rewind_step"] == 16
    for n, v in t.model.items():  # seeded by step 16: masked where masked, untouched elsewhere
        assert torch.equal(v, at16.model[n] * t.masks[n] if n in t.masks else at16.model[n]), n
    differs = []
    for g in pipe_groups():
        keep = kept_filters(t.masks, g)
        assert int(keep.sum()) == max(1, round(0.5 * g.size)), g.name
        s8, s16 = l2_scores(at8.model, g), l2_scores(at16.model, g)
        assert s8[keep].min() >= s8[~keep].max(), f"{g.name}: not the top filters of the step-8 weights"
        if s16[keep].min() < s16[~keep].max():
            differs.append(g.name)
    assert differs, "the step-8 and step-16 weights rank every group alike: the test cannot tell them apart"


def test_killed_retraining_resumes_exactly(pretrained, tmp_path):
    """Retraining (dense, data parallel, masked) killed mid-way and resumed ends bit-identical."""
    base = copy_run(pretrained, tmp_path / "base")
    ok(run_job(0, ["--stage", "prune", *PIPE, "prune.ratios=[0.6]", f"output.dir={base}"]))
    runs = {}
    for name in ("straight", "killed"):
        d = tmp_path / name
        d.mkdir()
        for f in ("pretrain.h5", "tickets_p60.h5"):
            shutil.copy(base / f, d / f)
        args = ["--stage", "retrain", *PIPE, "prune.ratios=[0.6]", "output.checkpoint_every=4it", f"output.dir={d}"]
        if name == "killed":
            p = run_job(2, args, env={"LOFT_FAULT_INJECT": "0:7:retrain_p60"})
            assert p.returncode == 1 and "injected fault" in p.stderr, p.stderr[-2000:]
            assert not (d / "retrain_p60.h5").exists()
        p = ok(run_job(2, args))
        if name == "killed":
            assert "resumed from" in p.stdout and "at step 4/12" in p.stdout
        runs[name] = read_run_file(d / "retrain_p60.h5")
    a, b = runs["straight"], runs["killed"]
    assert_same_run(a, b)
    for n, m in b.masks.items():
        assert torch.count_nonzero(b.model[n][~m]) == 0


def test_stage_all_ends_with_the_summary_table(structured_p50, tmp_path):
    """Stage all on a folder where pretraining and the p50 ticket are finished: each finished stage
    skips itself (its file untouched), only p70 is pruned and retrained, the summary covers both."""
    out = copy_run(structured_p50[0], tmp_path / "all")
    before = digests(out)
    p = ok(run_job(2, ["--stage", "all", *PIPE, "prune.ratios=[0.5,0.7]", f"output.dir={out}"]))
    skipped = {ln.split("]", 1)[1].split(":")[0].strip(): ln for ln in p.stdout.splitlines()
               if "exists, skipping" in ln}
    assert set(skipped) == {"pretrain", "prune", "retrain"}, p.stdout
    for stage, f in (("pretrain", "pretrain.h5"), ("prune", "tickets_p50.h5"), ("retrain", "retrain_p50.h5")):
        assert f"{stage}: {out / f} exists, skipping" in skipped[stage]
        assert digests(out)[f] == before[f], f"{f} was rewritten"
    assert "tickets_p70.h5" not in before and "retrain_p70.h5" not in before
    assert (out / "tickets_p70.h5").is_file() and (out / "retrain_p70.h5").is_file()
    table = (out / "summary.txt").read_text()
    assert table in p.stdout.replace("\r", ""), f"--- summary.txt\n{table}\n--- stdout\n{p.stdout[-4000:]}"
    lines = table.splitlines()
    assert lines[2].startswith("pretrained LoFT-2 (unpruned)"), table
    rows = {ln.split()[1]: ln.split() for ln in lines if ln.startswith("ticket")}
    assert set(rows) == {"50%", "70%"}, table
    for r in (50, 70):
        rf = read_run_file(out / f"retrain_p{r}.h5")
        # the accuracy printed is the retrained file's last test accuracy; the pruned share is the
        # masks' (counted here), within 2 points of p (per-group rounding of round((1-p) C) filters)
        assert float(rows[f"{r}%"][3]) == pytest.approx(rf.metrics[-1]["test_acc"], abs=5e-5), (table, rf.metrics[-1])
        pruned = 1 - sum(int(m.sum()) for m in rf.masks.values()) / sum(m.numel() for m in rf.masks.values())
        assert float(rows[f"{r}%"][4].rstrip("%")) == pytest.approx(100 * pruned, abs=0.05), (table, pruned)
        assert abs(100 * pruned - r) < 2.0, pruned
        # bytes over all links, from the file's /comm rows (2 ranks: every payload byte sent crosses one link)
        links = sum(int(c["allgather_sent"]) + int(c["allreduce_sent"]) for c in rf.comm)
        assert " ".join(rows[f"{r}%"][5:7]) == (f"{links / 1e9:.4f} GB" if links >= 1e7 else f"{links / 1e6:.3f} MB")
