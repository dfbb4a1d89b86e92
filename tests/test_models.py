"""Models: shapes, filter groups, partition rules, and that slicing a group equals zeroing it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loft_hpc.config.schema import ModelConfig
from loft_hpc.models import ARCH_NAMES, FilterGroup, GroupedModel, build_model
from loft_hpc.models.groups import check_groups
from loft_hpc.partition.slicing import TensorSlicer, subnetwork, zero_channels

WIDTH = 8
RESNETS = ("preresnet18", "preresnet34", "resnet34", "resnet18_lth")
# (dataset, in_channels, image_size, classes, stem)
SHAPES = [("cifar10", 3, 32, 10, "auto"), ("digits", 1, 32, 10, "auto")]


def make(arch: str, *, in_channels=3, image_size=32, num_classes=10, dataset="cifar10", **cfg) -> GroupedModel:
    cfg = ModelConfig(arch=arch, width=cfg.pop("width", WIDTH), **cfg)
    return build_model(cfg, num_classes=num_classes, in_channels=in_channels, image_size=image_size, dataset=dataset)


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so that zeroed channels matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def random_keep(groups: list[FilterGroup], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for grp in groups:
        k = int(torch.randint(1, max(grp.size, 2), (1,), generator=g).clamp(max=grp.size))
        keep[grp.name] = torch.randperm(grp.size, generator=g)[:k].sort().values
    return keep


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("dataset,cin,size,classes,stem", SHAPES)
def test_builds_forward_and_groups(arch, dataset, cin, size, classes, stem):
    model = make(arch, in_channels=cin, image_size=size, num_classes=classes, dataset=dataset, stem=stem)
    assert model(torch.randn(2, cin, size, size)).shape == (2, classes)
    groups = model.filter_groups()
    assert groups
    check_groups(model, groups)
    state = model.state_dict()
    for g in groups:
        assert state[g.producer].shape[0] == g.size
    names = model.prunable_weights()
    assert "classifier.weight" in names and model.layer_kind("classifier.weight") == "fc"
    assert all(model.layer_kind(n) in ("conv", "fc") for n in names)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == classes


def test_imagenet_stem():
    model = make("preresnet18", image_size=64, dataset="imagenet", num_classes=20)
    assert model.conv1.kernel_size == (7, 7) and model.maxpool is not None
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 20)
    check_groups(model, model.filter_groups())
    cifar = make("preresnet18", image_size=64, dataset="imagenet", stem="cifar")
    assert cifar.conv1.kernel_size == (3, 3) and cifar.maxpool is None and cifar.bn1 is None


def test_preresnet34_partition_rules():
    model = make("preresnet34")
    groups = model.filter_groups()
    assert len(groups) == 16 and [g.name for g in groups][:3] == ["layer1.0.inner", "layer1.1.inner", "layer1.2.inner"]
    expected = [f"layer2.{i}.inner" for i in (1, 2, 3)] + [f"layer3.{i}.inner" for i in (1, 2, 3, 4, 5)] + [
        f"layer4.{i}.inner" for i in (1, 2)]
    assert [g.name for g in groups if g.partitioned] == expected
    g = next(g for g in groups if g.name == "layer3.2.inner")
    assert g.producer == "layer3.2.conv1.weight"
    assert set(g.tensors()) == {"layer3.2.conv1.weight", "layer3.2.conv2.weight"} | {
        f"layer3.2.bn2.{t}" for t in ("weight", "bias", "running_mean", "running_var")}
    assert all(g.partitioned for g in make("preresnet34", partition_rule="all").filter_groups())
    assert not any(g.partitioned for g in make("preresnet34", partition_rule="none").filter_groups())


def test_post_activation_groups_use_bn1():
    groups = make("resnet18_lth", width=16).filter_groups()
    assert [g.name for g in groups if g.partitioned] == ["layer2.1.inner", "layer2.2.inner", "layer3.1.inner", "layer3.2.inner"]
    assert "layer2.1.bn1.weight" in groups[4].tensors() and groups[4].size == 32


@pytest.mark.parametrize("arch", ["lenet300_100", "conv2", "conv4", "conv6", "vgg19"])
def test_lth_models_partition_every_hidden_group(arch):
    groups = make(arch).filter_groups()
    assert all(g.partitioned for g in groups)
    assert not any(g.partitioned for g in make(arch, partition_rule="none").filter_groups())
    n_hidden = {"lenet300_100": 2, "conv2": 4, "conv4": 6, "conv6": 8, "vgg19": 16}[arch]
    assert len(groups) == n_hidden


def test_canonical_lth_sizes():
    lenet = make("lenet300_100", in_channels=1, image_size=28, width=64)
    assert [g.size for g in lenet.filter_groups()] == [300, 100] and lenet.fc1.in_features == 784
    conv6 = make("conv6", width=64)
    assert [g.size for g in conv6.filter_groups()] == [64, 64, 128, 128, 256, 256, 256, 256]
    assert conv6.fc1.in_features == 256 * 4 * 4
    vgg = make("vgg19", width=64)
    assert [g.size for g in vgg.filter_groups()] == [64, 64, 128, 128] + [256] * 4 + [512] * 8


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_subnetwork_equals_zeroed_channels(arch):
    torch.manual_seed(0)
    cin = 1 if arch == "lenet300_100" else 3
    model = make(arch, in_channels=cin, partition_rule="all").double().eval()
    randomise(model)
    groups = model.filter_groups()
    keep = random_keep(groups)
    sub = subnetwork(model, TensorSlicer(groups), keep).eval()
    assert count(sub) < count(model)
    sub_modules = dict(sub.named_modules())
    for g in groups:
        producer = sub_modules[g.producer.rpartition(".")[0]]
        assert producer.weight.shape[0] == len(keep[g.name])
        out = producer.out_channels if isinstance(producer, nn.Conv2d) else producer.out_features
        assert out == len(keep[g.name])

    zeroed = copy.deepcopy(model)
    for g in groups:
        dropped = torch.tensor(sorted(set(range(g.size)) - set(keep[g.name].tolist())), dtype=torch.long)
        if len(dropped):
            zero_channels(zeroed, g, dropped)
    x = torch.randn(3, cin, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want, got, full = zeroed(x), sub(x), model(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(full, want, atol=1e-3)  # the dropped channels did matter


def test_subnetwork_loft_rule_slices_only_partitioned():
    model = make("preresnet34").double().eval()
    randomise(model)
    groups = [g for g in model.filter_groups() if g.partitioned]
    keep = random_keep(groups, seed=3)
    sub = subnetwork(model, TensorSlicer(model.filter_groups()), keep)
    assert sub.layer1[0].conv1.out_channels == model.layer1[0].conv1.out_channels
    assert sub.layer2[1].conv1.out_channels == len(keep["layer2.1.inner"]) < model.layer2[1].conv1.out_channels
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert sub.eval()(x).shape == (2, 10)


@pytest.mark.parametrize("arch", ["preresnet18", "conv4", "vgg19"])
def test_write_back_round_trip(arch):
    model = make(arch)
    groups = model.filter_groups()
    slicer = TensorSlicer(groups)
    keep = random_keep(groups, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = model.state_dict()
    for name in slicer.sliced_tensors(keep):
        part = slicer.extract(name, state[name], keep)
        slicer.write_back(name, state[name], part + 1.0, keep)
    after = model.state_dict()
    for name, old in before.items():
        changed = after[name] != old
        if name not in slicer.sliced_tensors(keep):
            assert not changed.any(), name
            continue
        expected = torch.ones_like(old, dtype=torch.bool)
        for dim, entries in slicer.index(name, keep):
            along = torch.zeros(old.shape[dim], dtype=torch.bool)
            along[entries] = True
            shape = [1] * old.dim()
            shape[dim] = -1
            expected = expected & along.view(shape)
        assert torch.equal(changed, expected), name
        assert torch.allclose(after[name][expected], old[expected] + 1.0)


def test_inner_width_factor_and_width():
    base = make("preresnet34")
    wide = make("preresnet34", inner_width_factor=2.0)
    for a, b in zip(base.filter_groups(), wide.filter_groups()):
        assert b.size == 2 * a.size
    assert wide.layer2[1].conv2.out_channels == base.layer2[1].conv2.out_channels  # residual stream unchanged
    check_groups(wide, wide.filter_groups())
    assert wide(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    double = make("resnet34", width=2 * WIDTH)
    assert [g.size for g in double.filter_groups()] == [2 * g.size for g in make("resnet34").filter_groups()]
    assert double.classifier.in_features == 8 * 2 * WIDTH


@pytest.mark.parametrize("arch,kw,msg", [
    ("conv6", dict(image_size=4), "image_size must be >= 8"),
    ("vgg19", dict(image_size=8), "image_size must be >= 16"),
    ("conv2", dict(stem="imagenet"), "no stem"),
    ("lenet300_100", dict(inner_width_factor=2.0), "ResNets only"),
    ("preresnet18", dict(inner_width_factor=0.01), "no inner channels"),
    ("resnet34", dict(num_classes=0), "num_classes"),
])
def test_impossible_combinations(arch, kw, msg):
    with pytest.raises(ValueError, match=msg):
        make(arch, **kw)


def test_unknown_arch():
    cfg = ModelConfig(arch="alexnet")
    with pytest.raises(ValueError, match="unknown arch"):
        build_model(cfg, num_classes=10, in_channels=3, image_size=32, dataset="cifar10")
