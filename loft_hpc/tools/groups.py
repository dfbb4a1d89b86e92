"""``loft-tools groups``: the filter groups of a model, before any run: hand-written for the
package's own models, derived from the graph for ``torchvision.<name>`` and
``package.module:factory`` (README, Your own model).

    loft-tools groups ARCH [ARCH ...] [--image-size 32] [--channels 3] [--classes 10]
                      [--rule loft|all|auto|none] [--list] [--speed 2 4] [--batch 16] [--reps 5]

For each model: the groups found and how many the rule partitions, the channel spaces kept whole
(residual streams, gates), and the partitioned share of

- parameters: the parameters of every tensor a partitioned group slices (P_par of
  :func:`loft_hpc.exchange.accounting.model_floats`) / all trainable parameters;
- FLOPs: the multiply-accumulates of the conv and linear layers whose weight a partitioned group
  slices / those of every conv and linear layer (one forward pass on one image).

``--list``: every group (producer, filters, partitioned, its member tensors). ``--speed S ...``: one
rank's sub-network of S ranks (round 0's deal) against the full network, a training step on one
core (alternating blocks of ``--reps`` steps, the fastest block of each), beside the FLOPs ratio.
A model the derivation cannot follow is reported in one line (exit 2).
"""
from __future__ import annotations


def add_arguments(ap) -> None:
    ap.add_argument("archs", nargs="+", metavar="ARCH", help="model.arch values")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--width", type=int, default=None, help="model.width for the package's own archs")
    ap.add_argument("--rule", default="loft", choices=("loft", "all", "auto", "none"), help="model.partition_rule")
    ap.add_argument("--list", action="store_true", help="every group")
    ap.add_argument("--speed", type=int, nargs="*", default=[], metavar="S",
                    help="time one rank's sub-network of S ranks against the full network (one core)")
    ap.add_argument("--batch", type=int, default=16, help="batch of the timed steps")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per block")


def describe(model, image: tuple[int, int, int]) -> dict:
    """Groups, tied spaces and the partitioned shares of one model."""
    import torch

    from loft_hpc.bench.subnet import layer_flops
    from loft_hpc.exchange.accounting import model_floats, partitioned_tensors

    groups = model.filter_groups()
    f = model_floats(model, groups)
    part = partitioned_tensors(groups)
    fl = layer_flops(model, torch.zeros(1, *image))
    total = sum(fl.values())
    return {"groups": len(groups), "partitioned": sum(g.partitioned for g in groups),
            "tied": len(getattr(model, "derived_tied", []) or []),
            "params": f.params, "params_share": f.partitioned_params / f.params if f.params else 0.0,
            "flops": total, "flops_share": sum(v for n, v in fl.items() if n in part) / total if total else 0.0}


def speed(model, world: int, image: tuple[int, int, int], batch: int, reps: int, blocks: int = 3) -> dict:
    """One rank's sub-network (round 0's deal of ``world`` ranks) against the full network: the
    fastest block's seconds per training step on one core, and the FLOPs of each."""
    import copy

    import torch

    from loft_hpc.bench.subnet import compare_steps
    from loft_hpc.partition.plan import PartitionPlan
    from loft_hpc.partition.slicing import TensorSlicer, subnetwork

    part = [g for g in model.filter_groups() if g.partitioned]
    full = copy.deepcopy(model)
    sub = subnetwork(full, TensorSlicer(part), PartitionPlan.draw(0, 0, part, world).keep(0)) if part else copy.deepcopy(full)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *image, generator=gen)
    y = torch.randint(0, 2, (batch,), generator=gen)
    return {"S": world, **compare_steps(full, sub, x, y, reps, blocks, warmup=1)}


def run(a) -> int:
    from loft_hpc.config.schema import ModelConfig
    from loft_hpc.models.registry import build_model
    from loft_hpc.tools.reading import ToolError

    image = (a.channels, a.image_size, a.image_size)
    print(f"{'model':<28} {'groups':>7} {'part.':>6} {'tied':>5} {'parameters':>12} {'part. params':>13} "
          f"{'FLOPs/image':>14} {'part. FLOPs':>12}")
    for arch in a.archs:
        kw = {"width": a.width} if a.width else {}
        try:
            model = build_model(ModelConfig(arch=arch, partition_rule=a.rule, **kw), num_classes=a.classes,
                                in_channels=a.channels, image_size=a.image_size, dataset="synthetic")
        except ValueError as e:
            raise ToolError(f"{arch}: {e}") from None
        d = describe(model, image)
        print(f"{arch:<28} {d['groups']:>7} {d['partitioned']:>6} {d['tied']:>5} {d['params']:>12,} "
              f"{d['params_share']:>12.1%} {d['flops']:>14,} {d['flops_share']:>11.1%}")
        if a.list:
            for g in model.filter_groups():
                print(f"    {g.producer:<44} {g.size:>5} filters  {'partitioned' if g.partitioned else 'shared':<11} "
                      f"{len(g.members)} tensors: {', '.join(f'{m.tensor}[{m.dim}]' for m in g.members)}")
        for s in a.speed:
            sp = speed(model, s, image, a.batch, a.reps)
            print(f"    S={s}: step {sp['full_step_ms']:.1f} ms full, {sp['sub_step_ms']:.1f} ms sub-network: speed-up "
                  f"{sp['speedup']:.2f}x against a FLOPs ratio of {sp['flops_ratio']:.2f}x (one core, batch {a.batch})")
    return 0
