"""Stage 3, graph: channel coupling from Torch-Pruning's ``DependencyGraph``, behind one adapter.

This is the only module that imports ``torch_pruning`` or knows its op names: it tells the tracer about
every registered layer type it does not know (a pruner made from the layer's shrinker), and describes what
it found in compactor's own terms (:class:`Member` with a :class:`Kind` and a :class:`Side`). It checks the library's preconditions (grad mode
on, every parameter requiring grad while tracing, train/eval mode restored), turns its groups into our
own frozen :class:`ChannelGroup`, and sanity-checks every index mapping: Torch-Pruning treats unknown
ops as channel-preserving and mis-maps some layouts (a tensor feeding both a ``cat`` and a conv maps
the wrong channels onto the conv, for one). A member whose indices fall outside its layer is dropped
and the group is flagged; the verification stage remains the judge of what ships. The walk from a root
to its coupled channels is Torch-Pruning's, with a bound: through a rotary embedding it never ends.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import CouplingUnsettled, GraphError, first_line
from ..inputs import ExampleInputs, flatten_outputs
from ..layers import Role, Shrinker, Side, registered_types, shrinker_for, shrinker_of_type
from ..util import eval_mode_restored


class Kind(str, Enum):
    """What a member of a group is, as far as channels are concerned."""

    LAYER = "layer"  # a module or bare parameter compactor can rebuild
    MULTIPLY = "multiply"  # an elementwise product (a gate: squeeze-excite)
    SPLIT = "split/chunk"  # a split or chunk: sizes fixed in the forward code
    UNBIND = "unbind"
    SLICE = "slice"  # a slice that may cut the channel dimension
    OUTPUT = "output"  # a model output
    OTHER = "other"  # any other op (add, concat, reshape, a slice of another dimension...)

    @property
    def fixed_sizes(self) -> bool:
        """The op cuts channels at sizes the forward code fixes: removing one shifts the others."""
        return self in (Kind.SPLIT, Kind.UNBIND, Kind.SLICE)


@dataclass(frozen=True)
class Member:
    """One place a group's channels meet: a layer (or bare parameter, or functional op) and a side."""

    name: str  # module name, parameter name, or Torch-Pruning's name for a functional op
    op: str  # class name: Conv2d, BatchNorm2d, Parameter, or the traced op's (for messages)
    side: Side  # Side.OUT: the layer writes these channels; Side.IN: the layer reads them
    kind: Kind
    pruning_dim: int  # for bare parameters: the dimension that holds the channels
    idxs: tuple[tuple[int, ...], ...]  # per root channel: the layer-local indices it maps to


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together: removing root channel r removes ``idxs[r]`` everywhere."""

    root: str
    size: int
    members: tuple[Member, ...]
    reaches_output: bool
    issues: tuple[str, ...]
    norm_after: tuple[tuple[str, str], ...] = ()  # (member layer, the BatchNorm it alone feeds)
    held: tuple[str, ...] = ()  # why the group must stay whole, found outside this trace (train mode)

    def layers(self, side: Side | None = None) -> list[Member]:
        return [m for m in self.members if m.kind is Kind.LAYER and (side is None or m.side is side)]


def build_groups(model: nn.Module, inputs: ExampleInputs, *, train: bool = False) -> list[ChannelGroup]:
    """Trace ``model`` on ``inputs`` and return one group per set of coupled channels.

    ``train``: trace the train-mode forward (Torch-Pruning switches to eval mode before it calls the
    forward; this switches back). Batch statistics move then: pass a copy."""

    def forward(m: nn.Module, x: ExampleInputs) -> Any:
        return m.train(train)(*x.args, **x.kwargs)

    names = {p: n for n, p in model.named_parameters()}
    outputs: list[torch.Tensor] = []

    def output_transform(out: Any) -> list[torch.Tensor]:
        outputs[:] = [t for _, t in flatten_outputs(out)]
        return outputs

    with _tracing_state(model):
        try:
            graph = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=inputs,
                forward_fn=forward,
                output_transform=output_transform,
                verbose=False,
                customized_pruners=_custom_pruners(),
            )
        except Exception as e:  # the library raises anything from AssertionError to KeyError
            raise GraphError(
                f"torch-pruning could not trace the model ({type(e).__name__}: {first_line(e)})"
            ) from e
        groups = _collect_groups(graph, model, names, _output_writers(graph, outputs))
    return groups


def _output_writers(graph: Any, outputs: list[torch.Tensor]) -> set[nn.Module]:
    """Layers whose own output is a model output. Torch-Pruning adds an output node only where an op that is
    not a layer writes the output (``logits = self.classifier(x)`` gets none), so the groups of such a
    layer would not know that a model output reads them. A blocking layer (a final LayerNorm) keeps its
    groups whole anyway, with its own reason."""
    grad_fns = {t.grad_fn for t in outputs if t.grad_fn is not None}
    return {
        node.module
        for node in graph.module2node.values()
        if isinstance(node.module, nn.Module)
        and node.grad_fn in grad_fns
        and _role(node.module) is not Role.BLOCKING
    }


@contextmanager
def _tracing_state(model: nn.Module) -> Iterator[None]:
    """Grad mode on and ``requires_grad`` on every parameter while tracing; restore both and every
    module's train/eval flag (Torch-Pruning leaves the model in eval mode)."""
    requires = {p: p.requires_grad for p in model.parameters()}
    with torch.enable_grad(), eval_mode_restored(model):
        for p in requires:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p, flag in requires.items():
                p.requires_grad_(flag)


def _custom_pruners() -> dict[type, Any]:
    """A Torch-Pruning pruner for every registered layer type the library does not know, made from the
    shrinker: the tracer then treats the layer as a leaf with the shrinker's widths (a channelwise layer
    couples its inputs to its outputs). Blocking types keep every group they touch whole, so the
    library's default for them (an op it traces through) is left as it is."""
    known = tuple(
        c for t in tp.DependencyGraph().REGISTERED_PRUNERS if (c := tp.ops.type2class(t)) is not None
    )
    pruners: dict[type, Any] = {}
    for cls in registered_types():
        shrinker = shrinker_of_type(cls)
        if not issubclass(cls, nn.Module) or issubclass(cls, known) or shrinker.role is Role.BLOCKING:
            continue
        pruners[cls] = (_ChannelwisePruner if shrinker.role is Role.CHANNELWISE else _ShrinkerPruner)(
            shrinker
        )
    return pruners


class _ShrinkerPruner(tp.pruner.function.BasePruningFunc):  # type: ignore[misc]  # untyped library base
    """Torch-Pruning's view of a layer type it does not know: widths from the shrinker; compactor never
    asks the library to prune, so the prune functions only need to be distinct (mixing) or one (channelwise)."""

    def __init__(self, shrinker: Shrinker[Any]) -> None:
        super().__init__()
        self.shrinker = shrinker

    def prune_out_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
        raise NotImplementedError("compactor rebuilds layers with their shrinkers")

    def prune_in_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
        raise NotImplementedError("compactor rebuilds layers with their shrinkers")

    def get_out_channels(self, layer: nn.Module) -> int | None:
        return self.shrinker.out_channels(layer)

    def get_in_channels(self, layer: nn.Module) -> int | None:
        return self.shrinker.in_channels(layer)


class _ChannelwisePruner(_ShrinkerPruner):
    """One prune function for both sides: Torch-Pruning's sign that inputs and outputs are the same channels."""

    prune_in_channels = _ShrinkerPruner.prune_out_channels


def _collect_groups(
    graph: Any, model: nn.Module, param_names: dict[Any, str], output_writers: set[nn.Module]
) -> list[ChannelGroup]:
    module_names = {m: n for n, m in model.named_modules()}
    writes_output = {module_names[m] for m in output_writers if m in module_names}
    covered: set[tuple[str, Side, int]] = set()  # (layer, side, index) already in a group
    norms = _norm_after(graph, module_names)
    groups: list[ChannelGroup] = []
    for module in list(graph.module2node.keys()):
        if not isinstance(module, nn.Module) or not _is_producer(module):
            continue
        name = module_names[module]
        pruner = graph.get_pruner_of_module(module)
        n = pruner.get_out_channels(module)
        if n is None or all((name, Side.OUT, i) in covered for i in range(n)):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tp_group = _pruning_group(graph, module, pruner.prune_out_channels, n)
        except CouplingUnsettled as e:
            covered.update((name, Side.OUT, i) for i in range(n))
            root = Member(name, type(module).__name__, Side.OUT, Kind.LAYER, 0, tuple((i,) for i in range(n)))
            groups.append(ChannelGroup(name, n, (root,), False, (str(e),)))
            continue
        group = _convert(tp_group, graph, name, n, module_names, param_names, covered)
        group = replace(
            group,
            norm_after=tuple((m.name, norms[m.name]) for m in group.layers() if m.name in norms),
            reaches_output=group.reaches_output
            or any(m.name in writes_output for m in group.layers(Side.OUT)),
        )
        for member in group.layers():
            covered.update((member.name, member.side, i) for idx in member.idxs for i in idx)
        groups.append(group)
    return groups


_MAX_VISITS = 16  # one node reached with this many index sets: the coupling cycles (rotary embeddings do; the
# zoo and the benchmark models reach a node at most 3 times)


def _pruning_group(graph: Any, module: nn.Module, prune_out: Any, n: int) -> Any:
    """``graph.get_pruning_group(module, prune_out, range(n))``, the same walk with a bound.

    Torch-Pruning walks the dependencies from the root until no (layer, indices) pair is new. Some index
    mappings never repeat (a rotary embedding's half-split, negate and concatenate shifts the indices on
    every lap), so the walk never ends (VainF/Torch-Pruning#527, #456, #337): here a node reached with
    more than ``_MAX_VISITS`` index sets raises :class:`~compactor.errors.CouplingUnsettled`, and that
    root's channels are kept."""
    from torch_pruning import _helpers
    from torch_pruning.dependency import index_mapping
    from torch_pruning.dependency.dependency import Dependency
    from torch_pruning.dependency.group import Group

    if _tp_depthwise(module):
        prune_out = tp.pruner.function.prune_depthwise_conv_out_channels  # as Torch-Pruning does
    index_mapping.update_index_mapping(graph)
    root = graph.module2node[module]
    walk = Group()
    walk.add_dep(
        Dependency(prune_out, prune_out, source=root, target=root),
        [_helpers._HybridIndex(idx=i, root_idx=i) for i in range(n)],
    )
    seen = {(root, prune_out, tuple(walk[0].idxs))}  # Group.has_pruning_op, as a set: the walk is linear
    visited: set[Any] = set()
    visits: dict[Any, int] = defaultdict(int)
    stack = [(walk[0].dep, walk[0].idxs)]
    while stack:
        dep, idxs = stack.pop()
        visited.add(dep.target)
        for nxt in dep.target.dependencies:
            if not nxt.is_triggered_by(dep.handler):
                continue
            mapped = idxs
            for mapping in nxt.index_mapping:
                if mapping is not None:
                    mapped = mapping(mapped)
            key = (nxt.target, nxt.handler, tuple(mapped))
            if len(mapped) == 0 or (nxt.target in visited and key in seen):
                continue
            visits[nxt.target] += 1
            if visits[nxt.target] > _MAX_VISITS:
                raise CouplingUnsettled(
                    f"torch-pruning's channel coupling from {graph._module2name.get(module, module)} does not settle (it "
                    f"cycles through {nxt.target.name}, as through a rotary embedding): kept"
                )
            walk.add_dep(nxt, mapped)
            seen.add(key)
            stack.append((nxt, mapped))
    merged = Group()
    for dep, idxs in walk.items:
        merged.add_and_merge(dep, idxs)
    merged._DG = graph
    for i in range(len(merged)):
        item = _helpers.GroupItem(merged[i].dep, _helpers.to_plain_idxs(merged[i].idxs))
        item.root_idxs = _helpers.to_root_idxs(merged[i].idxs)
        merged[i] = item
    return merged


def _norm_after(graph: Any, module_names: dict[nn.Module, str]) -> dict[str, str]:
    """Mixing layers whose output goes to exactly one place, a layer of the same width that can absorb a
    constant shift of its input (a BatchNorm: see ``Shrinker.absorb_shift``)."""
    found = {}
    for module, node in graph.module2node.items():
        if not isinstance(module, nn.Module) or module not in module_names or len(node.outputs) != 1:
            continue
        after = node.outputs[0].module
        shrinker, norm = shrinker_for(module), shrinker_for(after)
        if (
            norm is not None
            and after in module_names
            and norm.role_of(after) is Role.CHANNELWISE
            and norm.can_absorb_shift(after)
            and shrinker is not None
            and shrinker.role_of(module) is Role.MIXING
            and shrinker.out_channels(module) == norm.in_channels(after)
        ):
            found[module_names[module]] = module_names[after]
    return found


def _is_producer(module: nn.Module) -> bool:
    """A layer that writes channels from mixed inputs: Conv (grouped too), Linear... and grouped transposed
    convs, whose groups are kept whole but whose zeroed filters the report should still account for."""
    shrinker = shrinker_for(module)
    return (
        shrinker is not None
        and shrinker.role is Role.MIXING
        and shrinker.role_of(module) is not Role.CHANNELWISE
        and bool(shrinker.out_channels(module))
    )


def _convert(
    tp_group: Any,
    graph: Any,
    root: str,
    size: int,
    module_names: dict[nn.Module, str],
    param_names: dict[Any, str],
    covered: set[tuple[str, Side, int]],
) -> ChannelGroup:
    merged: dict[tuple[str, Side], dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    meta: dict[tuple[str, Side], tuple[str, Kind, int]] = {}
    issues: list[str] = []
    reaches_output = False
    for item in tp_group.items:
        dep, target = item.dep, item.dep.target.module
        side = Side.OUT if graph.is_out_channel_pruning_fn(dep.handler) else Side.IN
        if isinstance(target, nn.Parameter):
            name, op, kind = param_names.get(target, dep.target.name), "Parameter", Kind.LAYER
        elif target in module_names:
            name, op, kind = module_names[target], type(target).__name__, Kind.LAYER
        else:
            name, op, kind = dep.target.name, type(target).__name__, _kind_of_op(target, dep.target.name)
        if kind is Kind.OUTPUT:
            reaches_output = True
        if _false_depthwise(target):
            why = f"torch-pruning couples the inputs and outputs of {name} as if depthwise (groups == out_channels), which it is not"
            if why not in issues:
                issues.append(why)
        if kind is Kind.LAYER and _role(target) is Role.CHANNELWISE:
            side = Side.OUT  # a channelwise layer's input and output are the same channels
        key = (name, side)
        meta[key] = (op, kind, int(getattr(dep.target, "pruning_dim", 1) or 0))
        by_root = merged[key]
        for local, r in zip(item.idxs, item.root_idxs):
            by_root[r].add(local)
    members = []
    for (name, side), by_root in merged.items():
        op, kind, dim = meta[(name, side)]
        idxs = tuple(tuple(sorted(by_root[r])) if r in by_root else () for r in range(size))
        problem = _mapping_problem(name, side, op, kind, idxs, module_names, param_names, covered)
        if problem:
            issues.append(problem)
            continue
        members.append(Member(name, op, side, kind, dim, idxs))
    return ChannelGroup(root, size, tuple(members), reaches_output, tuple(issues))


def _tp_depthwise(module: Any) -> bool:
    """What Torch-Pruning treats as a depthwise conv (its input and output channels coupled)."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels > 1


def _false_depthwise(module: Any) -> bool:
    """A conv Torch-Pruning takes for depthwise (``groups == out_channels``) with another input width."""
    return _tp_depthwise(module) and not module.transposed and module.in_channels != module.out_channels


def _role(target: Any) -> Role | None:
    shrinker = shrinker_for(target)
    return shrinker.role_of(target) if shrinker is not None else None


_OP_KINDS = {
    "_SplitOp": Kind.SPLIT,
    "_UnbindOp": Kind.UNBIND,
    "_SliceOp": Kind.SLICE,
    "_OutputOp": Kind.OUTPUT,
}


def _kind_of_op(op: Any, traced_name: str | None) -> Kind:
    """Torch-Pruning's op object in compactor's terms."""
    kind = _OP_KINDS.get(type(op).__name__, Kind.OTHER)
    if kind is Kind.SLICE and not _slices_channels(op):
        return Kind.OTHER  # e.g. circular padding: channels pass through whole
    if kind is Kind.OTHER and "MulBackward" in (traced_name or ""):
        return Kind.MULTIPLY
    return kind


def _slices_channels(op: Any) -> bool:
    """Whether a traced slice may cut the channel dimension (dim 1 of a 4-D/5-D tensor; dim 1 or 2 of a
    3-D one). Mirrors Torch-Pruning, which ignores the other slices."""
    sizes = getattr(op.grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None:
        return True
    rank, dim = len(sizes), int(op.dim) % max(1, len(sizes))
    return dim in ((1, 2) if rank == 3 else (1,))


def _mapping_problem(
    name: str,
    side: Side,
    op: str,
    kind: Kind,
    idxs: tuple[tuple[int, ...], ...],
    module_names: dict[nn.Module, str],
    param_names: dict[Any, str],
    covered: set[tuple[str, Side, int]],
) -> str | None:
    """Why this member's index mapping cannot be right, or None."""
    if kind is not Kind.LAYER:
        return None
    target = _find(name, module_names, param_names)
    shrinker = shrinker_for(target)
    if shrinker is None:
        return None
    width = shrinker.out_channels(target) if side == Side.OUT else shrinker.in_channels(target)
    if op == "Parameter":
        width = target.shape[0]
    flat = [i for idx in idxs for i in idx]
    if width is not None and any(i >= width for i in flat):
        return f"torch-pruning mapped {max(flat) + 1} channels onto {name} ({side.value}), which has {width}"
    if len(set(flat)) != len(flat):
        return f"torch-pruning mapped two channels onto one index of {name} ({side.value})"
    if any((name, side, i) in covered for i in flat):
        return f"{name} ({side.value}) is already coupled to another group"
    return None


def _find(name: str, module_names: dict[nn.Module, str], param_names: dict[Any, str]) -> Any:
    for obj, n in module_names.items():
        if n == name:
            return obj
    for obj, n in param_names.items():
        if n == name:
            return obj
    return None
