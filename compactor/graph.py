"""Stage 3, graph: channel coupling from Torch-Pruning's ``DependencyGraph``, behind one adapter.

This is the only module that imports ``torch_pruning``. It checks the library's preconditions (grad mode
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
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from .errors import GraphError
from .inputs import ExampleInputs, flatten_outputs
from .layers import Role, shrinker_for

OUT, IN = "out", "in"


@dataclass(frozen=True)
class Member:
    """One place a group's channels meet: a layer (or bare parameter, or functional op) and a side."""

    name: str  # module name, parameter name, or Torch-Pruning's name for a functional op
    op: str  # class name: Conv2d, BatchNorm2d, Parameter, _ConcatOp, _OutputOp...
    side: str  # OUT: the layer writes these channels; IN: the layer reads them
    is_layer: bool  # True for modules and bare parameters we can rebuild
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

    def layers(self, side: str | None = None) -> list[Member]:
        return [m for m in self.members if m.is_layer and (side is None or m.side == side)]


def build_groups(model: nn.Module, inputs: ExampleInputs) -> list[ChannelGroup]:
    """Trace ``model`` on ``inputs`` and return one group per set of coupled channels."""
    names = {p: n for n, p in model.named_parameters()}
    with _tracing_state(model):
        try:
            graph = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=inputs,
                forward_fn=lambda m, x: m(*x.args, **x.kwargs),
                output_transform=lambda out: [t for _, t in flatten_outputs(out)],
                verbose=False,
            )
        except Exception as e:  # the library raises anything from AssertionError to KeyError
            raise GraphError(
                f"torch-pruning could not trace the model ({type(e).__name__}: {e}); "
                f"run with --debug and report the model's architecture"
            ) from e
        groups = _collect_groups(graph, model, names)
    return groups


class _tracing_state:
    """Grad mode on and ``requires_grad`` on every parameter while tracing; restore both and the mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.training = {m: m.training for m in model.modules()}
        self.requires = {p: p.requires_grad for p in model.parameters()}
        self.grad = torch.enable_grad()

    def __enter__(self) -> None:
        self.grad.__enter__()
        for p in self.requires:
            p.requires_grad_(True)

    def __exit__(self, *exc: object) -> None:
        self.grad.__exit__(*exc)
        for p, flag in self.requires.items():
            p.requires_grad_(flag)
        for m, flag in self.training.items():
            m.training = flag


def _collect_groups(graph: Any, model: nn.Module, param_names: dict[Any, str]) -> list[ChannelGroup]:
    module_names = {m: n for n, m in model.named_modules()}
    covered: set[tuple[str, str, int]] = set()  # (layer, side, index) already in a group
    norms = _norm_after(graph, module_names)
    groups: list[ChannelGroup] = []
    for module in list(graph.module2node.keys()):
        if not isinstance(module, nn.Module) or not _is_producer(module):
            continue
        name = module_names[module]
        pruner = graph.get_pruner_of_module(module)
        n = pruner.get_out_channels(module)
        if n is None or all((name, OUT, i) in covered for i in range(n)):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tp_group = _pruning_group(graph, module, pruner.prune_out_channels, n)
        except _Unsettled as e:
            covered.update((name, OUT, i) for i in range(n))
            root = Member(name, type(module).__name__, OUT, True, 0, tuple((i,) for i in range(n)))
            groups.append(ChannelGroup(name, n, (root,), False, (str(e),)))
            continue
        group = _convert(tp_group, graph, name, n, module_names, param_names, covered)
        group = replace(group, norm_after=tuple((m.name, norms[m.name]) for m in group.layers() if m.name in norms))
        for member in group.layers():
            covered.update((member.name, member.side, i) for idx in member.idxs for i in idx)
        groups.append(group)
    return groups


class _Unsettled(Exception):
    """Torch-Pruning's channel coupling from one root never settles."""


_MAX_VISITS = 16  # one node reached with this many index sets: the coupling cycles (rotary embeddings do; the
# zoo and the benchmark models reach a node at most 3 times)


def _pruning_group(graph: Any, module: nn.Module, prune_out: Any, n: int) -> Any:
    """``graph.get_pruning_group(module, prune_out, range(n))``, the same walk with a bound.

    Torch-Pruning walks the dependencies from the root until no (layer, indices) pair is new. Some index
    mappings never repeat (a rotary embedding's half-split, negate and concatenate shifts the indices on
    every lap), so the walk never ends (VainF/Torch-Pruning#527, #456, #337): here a node reached with
    more than ``_MAX_VISITS`` index sets raises :class:`_Unsettled`, and that root's channels are kept."""
    from torch_pruning import _helpers
    from torch_pruning.dependency import index_mapping
    from torch_pruning.dependency.dependency import Dependency
    from torch_pruning.dependency.group import Group

    if _tp_depthwise(module):
        prune_out = tp.pruner.function.prune_depthwise_conv_out_channels  # as Torch-Pruning does
    index_mapping.update_index_mapping(graph)
    root = graph.module2node[module]
    walk = Group()
    walk.add_dep(Dependency(prune_out, prune_out, source=root, target=root), [_helpers._HybridIndex(idx=i, root_idx=i) for i in range(n)])
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
                raise _Unsettled(
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
    """Mixing layers whose output goes to exactly one place, a BatchNorm of the same width."""
    found = {}
    for module, node in graph.module2node.items():
        if not isinstance(module, nn.Module) or module not in module_names or len(node.outputs) != 1:
            continue
        after = node.outputs[0].module
        shrinker = shrinker_for(module)
        if (
            isinstance(after, nn.modules.batchnorm._BatchNorm)
            and after in module_names
            and shrinker is not None
            and shrinker.role_of(module) is Role.MIXING
            and shrinker.out_channels(module) == after.num_features
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
    covered: set[tuple[str, str, int]],
) -> ChannelGroup:
    merged: dict[tuple[str, str], dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    meta: dict[tuple[str, str], tuple[str, bool, int]] = {}
    issues: list[str] = []
    reaches_output = False
    for item in tp_group.items:
        dep, target = item.dep, item.dep.target.module
        side = OUT if graph.is_out_channel_pruning_fn(dep.handler) else IN
        if isinstance(target, nn.Parameter):
            name, op, is_layer = param_names.get(target, dep.target.name), "Parameter", True
        elif target in module_names:
            name, op, is_layer = module_names[target], type(target).__name__, True
        else:
            name, op, is_layer = dep.target.name, type(target).__name__, False
            if op == "_SliceOp" and not _slices_channels(target):
                op = "_SpatialSliceOp"  # e.g. circular padding: channels pass through whole
        if op == "_OutputOp":
            reaches_output = True
        if _false_depthwise(target):
            why = f"torch-pruning couples the inputs and outputs of {name} as if depthwise (groups == out_channels), which it is not"
            if why not in issues:
                issues.append(why)
        if is_layer and shrinker_for(target) is not None and shrinker_for(target).role_of(target) is Role.CHANNELWISE:
            side = OUT  # a channelwise layer's input and output are the same channels
        key = (name, side)
        meta[key] = (op, is_layer, int(getattr(dep.target, "pruning_dim", 1) or 0))
        by_root = merged[key]
        for local, r in zip(item.idxs, item.root_idxs):
            by_root[r].add(local)
    members = []
    for (name, side), by_root in merged.items():
        op, is_layer, dim = meta[(name, side)]
        idxs = tuple(tuple(sorted(by_root[r])) if r in by_root else () for r in range(size))
        problem = _mapping_problem(graph, name, side, op, is_layer, idxs, module_names, param_names, covered)
        if problem:
            issues.append(problem)
            continue
        members.append(Member(name, op, side, is_layer, dim, idxs))
    return ChannelGroup(root, size, tuple(members), reaches_output, tuple(issues))


def _tp_depthwise(module: Any) -> bool:
    """What Torch-Pruning treats as a depthwise conv (its input and output channels coupled)."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels > 1


def _false_depthwise(module: Any) -> bool:
    """A conv Torch-Pruning takes for depthwise (``groups == out_channels``) with another input width."""
    return _tp_depthwise(module) and not module.transposed and module.in_channels != module.out_channels


def _slices_channels(op: Any) -> bool:
    """Whether a traced slice may cut the channel dimension (dim 1 of a 4-D/5-D tensor; dim 1 or 2 of a
    3-D one). Mirrors Torch-Pruning, which ignores the other slices."""
    sizes = getattr(op.grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None:
        return True
    rank, dim = len(sizes), int(op.dim) % max(1, len(sizes))
    return dim in ((1, 2) if rank == 3 else (1,))


def _mapping_problem(
    graph: Any,
    name: str,
    side: str,
    op: str,
    is_layer: bool,
    idxs: tuple[tuple[int, ...], ...],
    module_names: dict[nn.Module, str],
    param_names: dict[Any, str],
    covered: set[tuple[str, str, int]],
) -> str | None:
    """Why this member's index mapping cannot be right, or None."""
    if not is_layer:
        return None
    target = _find(name, module_names, param_names)
    shrinker = shrinker_for(target)
    if shrinker is None:
        return None
    width = shrinker.out_channels(target) if side == OUT else shrinker.in_channels(target)
    if op == "Parameter":
        width = target.shape[0]
    flat = [i for idx in idxs for i in idx]
    if width is not None and any(i >= width for i in flat):
        return f"torch-pruning mapped {max(flat) + 1} channels onto {name} ({side}), which has {width}"
    if len(set(flat)) != len(flat):
        return f"torch-pruning mapped two channels onto one index of {name} ({side})"
    if any((name, side, i) in covered for i in flat):
        return f"{name} ({side}) is already coupled to another group"
    return None


def _find(name: str, module_names: dict[nn.Module, str], param_names: dict[Any, str]) -> Any:
    for obj, n in module_names.items():
        if n == name:
            return obj
    for obj, n in param_names.items():
        if n == name:
            return obj
    return None
