"""Filter groups derived from a model's graph (``torch.fx``), for models nobody described by hand.

The model is traced symbolically and its shapes propagated on one sample. Every tensor value
whose dim 1 carries channels (``N x C x H x W``) or features (``N x F``) is given a *channel
space*; the walk follows each space through the operations that keep channels in place:

- a convolution (``groups = 1``) or a linear layer opens a new space, its output: the layer's
  weight rows (dim 0) and bias are that space's producer entries, and the layer's weight dim 1
  is a consumer of its input's space;
- a depthwise convolution (``groups = in = out``) keeps its input's space: its weight rows and
  bias are entries of that space (channel c in, channel c out);
- BatchNorm keeps the space (weight, bias, running mean and variance: entries of it);
- activations, dropout, pooling, global pooling and identity keep the space;
- flatten after ``C x H x W`` keeps the space with ``H W`` consecutive features per channel (a
  following linear layer consumes blocks of ``repeat = H W`` inputs), a mean over the spatial
  dims keeps it with one feature per channel;
- an addition or a product of two channel tensors (residual streams, squeeze-and-excitation
  gates) *ties* their spaces: the channels must stay aligned across every member.

A space that is opened by one producer, never tied, and is neither the input image nor the
output logits becomes a :class:`~loft_hpc.models.groups.FilterGroup` (named after its producer
module), the same description the hand-written models give, so partition plans, slicing, the
exchange, masks and scores need nothing else. Tied spaces stay whole: their tensors are shared
(held in full by every rank and averaged), as the hand-written ResNets treat their residual
streams. Anything else that takes a channel tensor is refused with one line naming the module
and the operation: a concatenation along channels (DenseNet, Inception), grouped convolutions
other than depthwise, channel shuffles, attention; data-dependent control flow already fails
the trace, and is reported the same way.

Partition rules on the derived groups (``model.partition_rule``):

- ``all`` (alias ``auto``): every derived group;
- ``loft`` (the paper's rule, from the graph): in a network with residual joins, the groups
  inside a block whose shortcut is the identity (its input reaches the join through
  parameter-free operations only), except in the first residual stream (the first stage); a
  network without residual joins partitions every group. On the package's ResNets this is the
  hand-written rule (inner channels of the non-first blocks of stages 2-4);
- ``none``: nothing partitioned.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from loft_hpc.models.groups import FilterGroup, Member

RULES = ("loft", "all", "auto", "none")


class UnsupportedGraph(ValueError):
    """The graph has an operation the derivation cannot follow (the message names it)."""


# Operations that keep channels in place (module types; functions; tensor methods).
_KEEP_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
                 nn.Sigmoid, nn.Tanh, nn.Mish, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
                 nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_KEEP_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid,
                   F.tanh, F.mish, F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                   F.adaptive_max_pool2d, torch.relu, torch.sigmoid, torch.tanh, torch.clone, torch.dropout}
_KEEP_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clone", "contiguous", "detach", "float"}
_JOIN_FUNCTIONS = {operator.add, operator.iadd, operator.mul, operator.imul, torch.add, torch.mul}
_JOIN_METHODS = {"add", "add_", "mul", "mul_"}
_FLATTEN_FUNCTIONS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_MEAN = ({torch.mean}, {"mean"})


@dataclass
class Space:
    """Channels that must be sliced together, before joins are merged."""

    size: int
    members: list[Member] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)  # weight tensors whose rows open the space
    order: int = 0                                      # the producing node's position in the graph
    node: str = ""                                      # the producing node (for the block rule)


@dataclass
class Derivation:
    """The result of :func:`derive`: the groups and what was kept whole (tied spaces, with the
    operations that tie them), for the README and the tests."""

    groups: list[FilterGroup]
    tied: list[tuple[list[str], list[str]]]  # (producers, joining nodes) of each tied class


class _Tracer(fx.Tracer):
    """Leaves: the layers the walk understands; records the module path being traced so that a
    failed trace names it."""

    def __init__(self) -> None:
        super().__init__()
        self.path: list[str] = []
        self.failed: str | None = None  # the innermost module whose forward raised

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.Flatten,
                              *_KEEP_MODULES)) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m) if m is not self.root else ""
        self.path.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None and path:
                self.failed = path
            raise
        finally:
            self.path.pop()


def trace(model: nn.Module) -> fx.GraphModule:
    """The model's graph; a trace that fails (data-dependent control flow, an unsupported
    Python construct) raises :class:`UnsupportedGraph` naming the innermost module."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds; one line for the user
        where = tracer.failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedGraph(f"{type(model).__name__}: cannot trace "
                               f"{'module ' + repr(where) if where else 'the forward'} ({type(e).__name__}: {first})")
    return fx.GraphModule(model, graph)


class _Shapes(fx.Interpreter):
    """Runs the graph once, recording every tensor node's shape in ``node.meta['tensor_meta']``."""

    def run_node(self, n: fx.Node):
        try:
            out = super().run_node(n)
        except Exception as e:  # noqa: BLE001 - reported with the node's module
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UnsupportedGraph(f"{_where(n)} fails on this input ({type(e).__name__}: {first})") from None
        if isinstance(out, torch.Tensor):
            n.meta["tensor_meta"] = out.shape
        return out


def _propagate_shapes(gm: fx.GraphModule, model: nn.Module, sample: torch.Tensor) -> None:
    was = model.training
    model.eval()  # BN on a batch of one
    try:
        with torch.no_grad():
            _Shapes(gm).run(sample)
    except UnsupportedGraph as e:
        raise UnsupportedGraph(f"{type(model).__name__}: {str(e).splitlines()[0]}; the input was {tuple(sample.shape)} (a larger "
                               "data.image_size?)") from None
    finally:
        model.train(was)


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    path = list(stack.values())[-1][0] if stack else ""
    return f"module {path!r}" if path else "the top-level forward"


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if "tensor_meta" in a.meta or a.op == "placeholder"]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm) if tm is not None else None


def derive(model: nn.Module, sample: torch.Tensor, rule: str = "loft") -> Derivation:
    """The filter groups of ``model`` (on its device) for an input like ``sample`` (a batch of one
    or more), partitioned by ``rule``. Raises :class:`UnsupportedGraph` with one line naming the
    module and the operation it cannot follow."""
    if rule not in RULES:
        raise ValueError(f"partition_rule must be one of {', '.join(RULES)}, got {rule!r}")
    gm = trace(model)
    _propagate_shapes(gm, model, sample)
    modules = dict(gm.named_modules())
    spaces: list[Space] = []
    parent: list[int] = []
    joins: dict[int, list[str]] = {}

    def new_space(size: int, order: int, node: str) -> int:
        spaces.append(Space(size, order=order, node=node))
        parent.append(len(parent))
        return len(spaces) - 1

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    INPUT, OUTPUT = set(), set()   # spaces holding the image channels / the logits
    value: dict[str, tuple[int, int]] = {}  # node name -> (space, features per channel along dim 1)
    block_joins: list[fx.Node] = []

    def rows(space: int, target: str, m: nn.Module) -> None:
        """The layer's weight rows and bias index ``space``."""
        spaces[space].members.append(Member(f"{target}.weight", 0))
        if m.bias is not None:
            spaces[space].members.append(Member(f"{target}.bias", 0))

    def produce(node: fx.Node, m: nn.Module, size: int, order: int) -> int:
        """A new space opened by the layer ``m`` at ``node``: its rows are the producer entries."""
        t = new_space(size, order, node.name)
        rows(t, node.target, m)
        spaces[t].producers.append(f"{node.target}.weight")
        return t

    def refuse(node: fx.Node, what: str) -> None:
        raise UnsupportedGraph(f"{type(model).__name__}: {what} at {_where(node)} (node {node.name}) is not supported "
                               "by the filter-group derivation")

    def val(node: fx.Node, arg: fx.Node) -> tuple[int, int]:
        if arg.name not in value:
            refuse(node, f"an input ({arg.name}) whose channels the derivation lost")
        return value[arg.name]

    for i, node in enumerate(gm.graph.nodes):
        shape = _shape(node)
        if node.op == "placeholder":
            if shape is None or len(shape) < 2:
                continue
            s = new_space(shape[1], i, node.name)
            INPUT.add(s)
            value[node.name] = (s, 1)
            continue
        if node.op == "output":
            for a in _tensor_args(node):
                if a.name in value:
                    OUTPUT.add(value[a.name][0])
            continue
        if node.op == "get_attr":
            continue
        ins = [a for a in _tensor_args(node) if a.name in value]
        if not ins:
            continue  # nothing with channels flows in (shapes, constants)
        if shape is None:
            if node.op == "call_method" and node.target in ("size", "dim") or node.target in (getattr, len):
                continue  # a shape query
            refuse(node, f"{node.op} {getattr(node.target, '__name__', node.target)!s} (no tensor output)")
        if node.op == "call_module":
            m = modules[node.target]
            (x,) = [a for a in node.args if isinstance(a, fx.Node)][:1] or [None]
            s, rep = val(node, x)
            if isinstance(m, nn.Conv2d):
                if rep != 1:
                    refuse(node, "a convolution of flattened features")
                if m.groups == 1:
                    spaces[s].members.append(Member(f"{node.target}.weight", 1))
                    value[node.name] = (produce(node, m, m.out_channels, i), 1)
                elif m.groups == m.in_channels == m.out_channels:
                    rows(s, node.target, m)  # depthwise: channel c in, channel c out
                    value[node.name] = (s, 1)
                else:
                    refuse(node, f"a grouped convolution (groups={m.groups}, {m.in_channels} -> {m.out_channels} "
                                 "channels; only depthwise groups are followed)")
            elif isinstance(m, nn.Linear):
                if shape is None or len(shape) != 2:
                    refuse(node, "a linear layer on a tensor that is not N x features")
                spaces[s].members.append(Member(f"{node.target}.weight", 1, rep))
                value[node.name] = (produce(node, m, m.out_features, i), 1)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if rep != 1:
                    refuse(node, "a BatchNorm over flattened features")
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(m, attr, None) is not None:
                        spaces[s].members.append(Member(f"{node.target}.{attr}", 0))
                value[node.name] = (s, 1)
            elif isinstance(m, nn.Flatten):
                value[node.name] = _flatten(node, x, s, rep, m.start_dim, refuse)
            elif isinstance(m, nn.PReLU) and m.num_parameters > 1:
                spaces[s].members.append(Member(f"{node.target}.weight", 0))
                value[node.name] = (s, rep)
            elif isinstance(m, _KEEP_MODULES):
                value[node.name] = (s, rep)
            else:
                refuse(node, f"module {type(m).__name__}")
            continue
        fn = node.target
        is_fn, is_method = node.op == "call_function", node.op == "call_method"
        if (is_fn and fn in _JOIN_FUNCTIONS) or (is_method and fn in _JOIN_METHODS):
            vs = [val(node, a) for a in ins]
            if len({r for _, r in vs}) > 1:
                refuse(node, f"{getattr(fn, '__name__', fn)} of tensors with different feature layouts")
            roots = {find(s) for s, _ in vs}
            keep = min(roots)
            for r in roots:
                parent[r] = keep
            if len(vs) > 1:
                joins.setdefault(keep, []).append(node.name)
                if fn in (operator.add, operator.iadd, torch.add, "add", "add_"):
                    block_joins.append(node)  # a residual join (a product is a gate, not a block)
            value[node.name] = (keep, vs[0][1])
        elif (is_fn and fn in _KEEP_FUNCTIONS) or (is_method and fn in _KEEP_METHODS):
            value[node.name] = val(node, ins[0])
        elif (is_fn and fn in _FLATTEN_FUNCTIONS) or (is_method and fn in _FLATTEN_METHODS):
            x = node.args[0]
            s, rep = val(node, x)
            if fn in ("view", "reshape"):
                out = _shape(node)
                if out is None or len(out) != 2 or out[0] != _shape(x)[0]:
                    refuse(node, f"{fn} to {out} (only N x features is followed)")
                value[node.name] = _flatten(node, x, s, rep, 1, refuse)
            else:
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                value[node.name] = _flatten(node, x, s, rep, start, refuse)
        elif (is_fn and fn in _MEAN[0]) or (is_method and fn in _MEAN[1]):
            x = node.args[0]
            s, rep = val(node, x)
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
            nd = len(_shape(x))
            if sorted(d % nd for d in dims) != list(range(2, nd)):
                refuse(node, f"a mean over dims {dims} (only the spatial dims keep the channels)")
            value[node.name] = (s, rep)
        elif is_fn and fn is torch.cat:
            refuse(node, "torch.cat (a concatenation of channels)")
        else:
            refuse(node, f"{node.op} {getattr(fn, '__name__', fn)!s}")

    # ------------------------------------------------------------------ classes -> groups
    classes: dict[int, list[int]] = {}
    for s in range(len(spaces)):
        classes.setdefault(find(s), []).append(s)
    groups_by_space: dict[int, FilterGroup] = {}
    tied = []
    for root, members in classes.items():
        producers = [p for s in members for p in spaces[s].producers]
        if len(members) > 1:
            tied.append((producers, joins.get(root, [])))
            continue
        (s,) = members
        if s in INPUT or s in OUTPUT or not spaces[s].producers:
            continue
        sp = spaces[s]
        name = sp.producers[0].rsplit(".", 1)[0]
        groups_by_space[s] = FilterGroup(name, sp.size, tuple(sp.members), False, sp.producers[0])
    ordered = [groups_by_space[s] for s in sorted(groups_by_space, key=lambda s: spaces[s].order)]
    part = _partition(gm, ordered, {g.name: spaces[s] for s, g in groups_by_space.items()}, block_joins, find, value,
                      rule)
    groups = [FilterGroup(g.name, g.size, g.members, g.name in part, g.producer) for g in ordered]
    return Derivation(groups, tied)


def _flatten(node, x, s: int, rep: int, start: int, refuse) -> tuple[int, int]:
    """(space, features per channel) after flattening ``x`` from dim ``start``."""
    if start != 1:
        refuse(node, f"a flatten from dim {start} (only flatten(1) keeps the batch apart)")
    per = 1
    for d in _shape(x)[2:]:
        per *= d
    return s, rep * per


def _partition(gm, groups, space_of, block_joins, find, value, rule) -> set[str]:
    """Names of the groups ``rule`` partitions (see the module docstring)."""
    if rule in ("all", "auto"):
        return {g.name for g in groups}
    if rule == "none":
        return set()
    if not block_joins:
        return {g.name for g in groups}
    ancestors: dict[str, set[str]] = {}
    for n in gm.graph.nodes:  # topological order
        acc = set()
        for a in n.all_input_nodes:
            acc.add(a.name)
            acc |= ancestors[a.name]
        ancestors[n.name] = acc
    modules = dict(gm.named_modules())

    def parameter_free(n: fx.Node) -> bool:
        if n.op == "call_module":
            return next(modules[n.target].parameters(), None) is None
        return n.op in ("call_function", "call_method") and len(n.all_input_nodes) == 1

    def identity_shortcut(join: fx.Node, producer: str) -> bool:
        """An operand of ``join`` not downstream of ``producer`` reaches an ancestor of the
        producer (the block's input) through parameter-free single-input operations."""
        for op in join.all_input_nodes:
            if op.name == producer or producer in ancestors[op.name]:
                continue  # the residual branch
            n = op
            while n.name not in ancestors[producer]:
                if not parameter_free(n):
                    return False
                n = n.all_input_nodes[0]
            return True
        return False  # both operands come after the producer: the group is not inside this block

    # residual streams in the order of their first join: the first is the first stage's
    streams: list[int] = []
    for j in block_joins:
        root = find(value[j.name][0])
        if root not in streams:
            streams.append(root)
    out = set()
    for g in groups:
        producer = space_of[g.name].node
        join = next((j for j in block_joins if producer in ancestors[j.name]), None)
        if join is not None and find(value[join.name][0]) != streams[0] and identity_shortcut(join, producer):
            out.add(g.name)
    return out
