"""Filter groups derived from the graph (loft_hpc/models/derive.py, loft_hpc/models/external.py).

- The derivation reproduces the hand-written groups of the package's own models (members, sizes,
  producers and the partition flags of every rule).
- torchvision's resnet18, resnet50 (bottlenecks), vgg11_bn and mobilenet_v2 (depthwise convs,
  inverted residuals): keeping a random subset of every partitioned group gives a smaller network
  whose output equals the full network's with the other channels zeroed (eval mode, BN statistics
  randomised so that a wrong channel shows), and a 2-rank LoFT run with train.check_sync passes.
- DenseNet (concatenation) and a model with data-dependent control flow are refused in one line
  naming the module and the operation, with exit 2 on every rank, before any collective.
"""
from __future__ import annotations

import copy
import textwrap

import pytest
import torch

from loft_hpc.config.schema import ModelConfig
from loft_hpc.models.derive import UnsupportedGraph, derive
from loft_hpc.models.registry import build_model
from loft_hpc.partition.plan import PartitionPlan
from loft_hpc.partition.slicing import TensorSlicer, subnetwork, zero_channels
from tests.mpi_util import TINY, ok, run_job

OWN = [("preresnet18", 3, 32, 8), ("preresnet34", 3, 32, 8), ("resnet34", 3, 32, 8), ("resnet18_lth", 3, 32, 16),
       ("vgg19", 3, 32, 64), ("conv2", 3, 32, 64), ("conv4", 3, 32, 64), ("conv6", 3, 32, 64),
       ("lenet300_100", 1, 28, 64)]


def _described(groups) -> set:
    return {(g.size, frozenset(g.members), g.partitioned, g.producer) for g in groups}


@pytest.mark.parametrize("rule", ["loft", "all", "none"])
@pytest.mark.parametrize("arch, channels, size, width", OWN)
def test_derived_groups_equal_the_hand_written_ones(arch, channels, size, width, rule):
    m = build_model(ModelConfig(arch=arch, width=width, partition_rule=rule), num_classes=10, in_channels=channels,
                    image_size=size, dataset="synthetic")
    derived = derive(m, torch.zeros(1, channels, size, size), rule)
    assert _described(derived.groups) == _described(m.filter_groups())
    assert [g.producer for g in derived.groups] == [g.producer for g in m.filter_groups()]  # the same order
    if arch in ("preresnet18", "preresnet34", "resnet34", "resnet18_lth"):
        assert len(derived.tied) == (3 if arch == "resnet18_lth" else 4)  # one residual stream per stage, kept whole


TORCHVISION = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2"]


def _randomise_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                for t, lo, hi in ((mod.running_mean, -1, 1), (mod.running_var, 0.5, 2), (mod.weight, 0.5, 1.5),
                                  (mod.bias, -1, 1)):
                    t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=gen))


@pytest.mark.parametrize("name", TORCHVISION)
def test_kept_channels_give_a_smaller_network_equal_to_the_zeroed_full_one(name):
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch=f"torchvision.{name}", partition_rule="all"), num_classes=10, in_channels=3,
                    image_size=32, dataset="synthetic")
    gen = torch.Generator().manual_seed(1)
    _randomise_bn(m, gen)
    part = [g for g in m.filter_groups() if g.partitioned]
    assert part, name
    keep = PartitionPlan.draw(5, 0, part, 3).keep(1)  # a third of every group, an uneven deal
    sub = subnetwork(m, TensorSlicer(part), keep)
    full = copy.deepcopy(m)
    for g in part:
        drop = torch.tensor(sorted(set(range(g.size)) - set(keep[g.name].tolist())), dtype=torch.long)
        zero_channels(full, g, drop)
    full.eval()
    sub.eval()
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        want, got = full(x), sub(x)
    assert sum(p.numel() for p in sub.parameters()) < 0.6 * sum(p.numel() for p in m.parameters())
    assert want.abs().max() > 1e-3  # the output is not trivially zero
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (name, float((got - want).abs().max()))
    for g in part:  # the small network's layers have the kept channel counts
        mod = dict(sub.named_modules())[g.producer.rsplit(".", 1)[0]]
        assert mod.weight.shape[0] == len(keep[g.name])


@pytest.mark.parametrize("name", TORCHVISION)
def test_two_rank_loft_with_check_sync(tmp_path, name):
    size = 32 if name == "vgg11_bn" else 16  # VGG's five poolings need 32 px
    p = ok(run_job(2, ["--stage", "pretrain", *TINY, "data.synthetic_train_size=32", "data.batch_size=4",
                       f"data.image_size={size}", f"model.arch=torchvision.{name}", "model.partition_rule=all",
                       "train.duration=4it", "train.local_steps=2", "train.eval_every=4it", "train.check_sync=true",
                       "train.bn_recalibration=0", "train.train_eval_samples=0", "train.lr=0.005",
                       f"output.dir={tmp_path}"]))
    assert "model.width=4, model.inner_width_factor=1.5 do(es) not apply" in p.stdout, p.stdout[-2000:]
    from loft_hpc.checkpoint.h5file import read_run_file

    rf = read_run_file(tmp_path / "pretrain.h5")
    assert all(bool(t.isfinite().all()) for t in rf.model.values() if t.is_floating_point())


def _refused(p, needle: str) -> None:
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}"
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "loft_hpc: error" in ln]
    assert len(lines) == 1 and needle in lines[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_densenet_concatenation_is_refused_in_one_line(tmp_path):
    p = run_job(2, ["--stage", "pretrain", *TINY, "data.image_size=32", "model.arch=torchvision.densenet121",
                    f"output.dir={tmp_path}"])
    _refused(p, "torch.cat (a concatenation of channels) at module 'features.denseblock1.denselayer1'")


def test_data_dependent_control_flow_is_refused_in_one_line(tmp_path):
    (tmp_path / "branchy_models.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Gate(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(8, 8, 3, padding=1)

            def forward(self, x):
                if x.mean() > 0:  # data-dependent: the tracer cannot follow it
                    return self.conv(x)
                return x

        def branchy(num_classes, in_channels):
            return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), Gate(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, num_classes))
    '''))
    p = run_job(2, ["--stage", "pretrain", *TINY, "model.arch=branchy_models:branchy", f"output.dir={tmp_path / 'o'}"],
                env={"PYTHONPATH": str(tmp_path)})
    _refused(p, "model.arch=branchy_models:branchy: Sequential: cannot trace module '1'")


def test_a_factory_model_runs_and_an_unknown_name_is_refused(tmp_path):
    (tmp_path / "my_models.py").write_text(textwrap.dedent('''
        from torch import nn

        def small_cnn(num_classes, in_channels, image_size):
            return nn.Sequential(nn.Conv2d(in_channels, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                 nn.Conv2d(12, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(10 * (image_size // 2) ** 2, num_classes))
    '''))
    env = {"PYTHONPATH": str(tmp_path)}
    m = None
    try:
        import sys
        sys.path.insert(0, str(tmp_path))
        m = build_model(ModelConfig(arch="my_models:small_cnn"), num_classes=10, in_channels=3, image_size=16,
                        dataset="synthetic")
    finally:
        sys.path.remove(str(tmp_path))
    groups = m.filter_groups()
    assert [(g.producer, g.size, g.partitioned) for g in groups] == [("0.weight", 12, True), ("3.weight", 10, True)]
    assert {mm.tensor: mm.repeat for mm in groups[1].members}["8.weight"] == 64  # 8 x 8 features per channel
    ok(run_job(2, ["--stage", "pretrain", *TINY, "model.arch=my_models:small_cnn", "train.duration=4it",
                   "train.local_steps=2", "train.eval_every=4it", "train.check_sync=true", f"output.dir={tmp_path / 'o'}"],
               env=env))
    p = run_job(2, ["--stage", "pretrain", *TINY, "model.arch=torchvision.resnet1000", f"output.dir={tmp_path / 'x'}"])
    _refused(p, "torchvision has no classification model 'resnet1000'")
    with pytest.raises(UnsupportedGraph):
        import torchvision

        derive(torchvision.models.get_model("shufflenet_v2_x0_5", num_classes=10), torch.zeros(1, 3, 32, 32))


def test_groups_tool_reports_the_derivation(tmp_path):
    """``loft-tools groups`` from another folder: resnet18's 8 groups, 3 partitioned by the paper's
    rule (layer2.1, layer3.1, layer4.1 inner channels), 4 residual streams kept whole, and the
    partitioned share of parameters recomputed here from the partitioned blocks' tensors; DenseNet
    refused in one line with exit 2."""
    import subprocess
    import sys
    from pathlib import Path

    tool = str(Path(sys.executable).parent / "loft-tools")
    p = subprocess.run([tool, "groups", "torchvision.resnet18", "--list"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    row = next(ln.split() for ln in p.stdout.splitlines() if ln.startswith("torchvision.resnet18"))
    m = build_model(ModelConfig(arch="torchvision.resnet18"), num_classes=10, in_channels=3, image_size=32,
                    dataset="synthetic")
    total = sum(t.numel() for t in m.parameters())
    inner = sum(t.numel() for n, t in m.named_parameters()
                if n.split(".")[0] in ("layer2", "layer3", "layer4") and n.split(".")[1] == "1"
                and n.split(".")[2] in ("conv1", "bn1", "conv2"))
    assert row[1:4] == ["8", "3", "4"] and int(row[4].replace(",", "")) == total
    assert row[5] == f"{inner / total:.1%}"
    listed = [ln.split()[0] for ln in p.stdout.splitlines() if "partitioned" in ln and "filters" in ln]
    assert sorted(listed) == ["layer2.1.conv1.weight", "layer3.1.conv1.weight", "layer4.1.conv1.weight"]
    p = subprocess.run([tool, "groups", "torchvision.densenet121"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "torch.cat" in p.stderr, p.stderr


@pytest.mark.parametrize("name, method", [("mobilenet_v2", "structured"), ("resnet18", "unstructured")])
def test_prune_and_retrain_a_torchvision_model(tmp_path, name, method):
    """The whole chain on a derived model: LoFT pretraining with score snapshots, a ticket (whole
    derived groups: depthwise channels go with their expansion; or single weights), retraining;
    the ticket's masks cover the derived groups' tensors and the distance tool reads the file."""
    from loft_hpc.checkpoint.h5file import read_run_file

    ok(run_job(2, ["--stage", "pretrain,prune,retrain", *TINY, "data.synthetic_train_size=32", "data.batch_size=4",
                   f"model.arch=torchvision.{name}", "model.partition_rule=all", "train.duration=4it",
                   "train.local_steps=2", "train.eval_every=4it", "output.snapshot_every=2it", "train.bn_recalibration=0",
                   "train.lr=0.005", "retrain.lr=0.005",
                   "train.train_eval_samples=0", f"prune.method={method}", "prune.ratios=[0.5]", "retrain.duration=2it",
                   f"output.dir={tmp_path}"]))
    ticket = read_run_file(tmp_path / "tickets_p50.h5")
    retrained = read_run_file(tmp_path / "retrain_p50.h5")
    m = build_model(ModelConfig(arch=f"torchvision.{name}"), num_classes=10, in_channels=3, image_size=16,
                    dataset="synthetic")
    groups = m.filter_groups()
    assert ticket.masks and set(ticket.masks) <= set(m.state_dict())
    if method == "structured":
        dw = [g for g in groups if any(mm.tensor.endswith(".1.0.weight") and mm.dim == 0 for mm in g.members)]
        assert dw  # a group holding a depthwise conv's rows
        masked = {mm.tensor for g in groups for mm in g.members} & set(ticket.masks)
        assert any(mm.tensor in masked for g in dw for mm in g.members if mm.dim == 0 and mm.tensor.endswith(".1.0.weight"))
    assert all(bool(t.isfinite().all()) for t in retrained.model.values() if t.is_floating_point())
    for n, mask in ticket.masks.items():  # retraining kept the pruned entries at zero
        assert (mask == 0).any() and not retrained.model[n][mask == 0].any(), n
    assert len(read_run_file(tmp_path / "pretrain.h5").snap_index) >= 2
    # the offline tools rebuild the derived model from the file alone (its output layer is not "classifier")
    import subprocess
    import sys
    from pathlib import Path

    tool = str(Path(sys.executable).parent / "loft-tools")
    p = subprocess.run([tool, "summary", str(tmp_path / "pretrain.h5")], cwd=tmp_path.parent, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and f"{len(groups)} filter group(s)" in p.stdout, p.stdout + p.stderr
    assert f"groups compared ({len(groups)})" in p.stdout, p.stdout
    p = subprocess.run([tool, "distance", str(tmp_path / "pretrain.h5")], cwd=tmp_path.parent, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "random" in p.stdout, p.stderr
