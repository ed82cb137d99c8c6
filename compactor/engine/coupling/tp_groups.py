"""Torch-Pruning's groups in compactor's terms (:func:`_convert`), and whether they can be trusted
(:func:`_suspect`).

The other half of the adapter (:mod:`.tp_adapter`): it imports nothing from ``torch_pruning`` but reads the
library's graph nodes, dependencies and op types by their attributes and names. It sanity-checks every index
mapping: Torch-Pruning treats unknown ops as channel-preserving and mis-maps some layouts, so a member whose
indices fall outside its layer is dropped and the group is flagged.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from ...layers import Role, Side, shrinker_for
from .groups import ChannelGroup, Join, Kind, Member

# Ops Torch-Pruning maps by rule. A reshape alone (a flatten before the classifier) it maps right; with one
# of the others in the same group (a permute to channels-last, then a flatten; a channel shuffle) it does not.
_SUSPECT_OPS = ("Permute", "Transpose", "Unflatten", "Roll", "Slice", "Split", "Unbind")
_RESHAPES = ("Reshape", "View")


def _suspect(groups: list[ChannelGroup]) -> bool:
    """Groups Torch-Pruning may have mapped wrongly: it dropped a member, a walk did not settle, or the
    channels pass an op it maps by rule rather than by what the op does."""
    for group in groups:
        if group.issues:
            return True
        ops = [m for m in group.members if m.kind is not Kind.LAYER]
        if any(m.kind.fixed_sizes or any(op in m.name or op in m.op for op in _SUSPECT_OPS) for m in ops):
            return True
        reshapes = [m for m in ops if any(op in m.name or op in m.op for op in _RESHAPES)]
        if len(reshapes) > 1:  # a split and a merge back (view -> ... -> view): a shuffle, heads
            return True
    return False


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
    merged: dict[tuple[str, Side], list[tuple[Any, Any]]] = defaultdict(list)
    meta: dict[tuple[str, Side], tuple[str, Kind, int]] = {}
    issues: list[str] = []
    reaches_output = False
    roots_at = _RootsAt(tp_group.items)  # node -> local -> roots, worked out where asked
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
            coupled = _self_coupled(name, dep.target, roots_at)
            if coupled and not any(i.endswith(_ONE_BY_ONE) for i in issues):
                issues.append(coupled)
        if kind is Kind.LAYER and side is Side.OUT and not dep.target.outputs:
            reaches_output = (
                True  # nothing traced reads what it writes: a model output (Torch-Pruning adds an
            )
            # output op only where the output is not a layer's own, so a classifier's rows would look free)
        key = (name, side)
        meta[key] = (op, kind, int(getattr(dep.target, "pruning_dim", 1) or 0))
        merged[key].append((item.root_idxs, item.idxs))
    members = []
    for (name, side), parts in merged.items():
        op, kind, dim = meta[(name, side)]
        idxs = _by_root(parts, size)
        problem = _mapping_problem(name, side, op, kind, idxs, module_names, param_names, covered)
        if problem:
            issues.append(problem)
            continue
        members.append(Member(name, op, side, kind, dim, idxs))
    joins = _joins(tp_group, module_names)
    return ChannelGroup(root, size, tuple(members), reaches_output, tuple(issues), joins=joins)


_JOIN_OPS = {"Add": "add", "Sub": "subtract", "Mul": "multiply", "Div": "divide"}


def _joins(tp_group: Any, module_names: dict[nn.Module, str]) -> tuple[Join, ...]:
    """The elementwise ops of the group with two or more operands in it, each operand traced back to the
    group's writing layers (the walk stops at any mixing layer and at nodes outside the group)."""
    nodes = {item.dep.target for item in tp_group.items}
    joins = []
    for node in nodes:
        operands = list(dict.fromkeys(n for n in node.inputs if n in nodes))
        if type(node.module).__name__ != "_ElementWiseOp" or len(operands) < 2:
            continue
        traced = [_writers_of(n, nodes, module_names) for n in operands]
        grad = type(node.grad_fn).__name__ if node.grad_fn is not None else "op"
        word = re.sub(r"Backward\d*$", "", grad)
        joins.append(
            Join(
                _JOIN_OPS.get(word, word.lower()),
                tuple(tuple(sorted(w)) for w in traced),
                tuple(sorted({name for w in traced for name, cat in w.items() if cat})),
            )
        )
    return tuple(sorted(joins, key=lambda j: (sum(map(len, j.operands)), j.operands)))


def _writers_of(start: Any, nodes: set[Any], module_names: dict[nn.Module, str]) -> dict[str, bool]:
    """The mixing layers upstream of ``start`` within the group: name -> reached through a concatenation."""
    found: dict[str, bool] = {}
    stack, seen = [(start, False)], set()
    while stack:
        node, cat = stack.pop()
        if (node, cat) in seen or node not in nodes:
            continue
        seen.add((node, cat))
        module = node.module
        if isinstance(module, nn.Module) and module in module_names and _is_producer(module):
            found[module_names[module]] = found.get(module_names[module], False) or cat
            continue
        cat = cat or type(module).__name__ == "_ConcatOp"
        stack.extend((n, cat) for n in node.inputs)
    return found


_ONE_BY_ONE = ": its channels cannot go one by one"


class _RootsAt:
    """Node -> local index -> the root indices Torch-Pruning's items map it from (computed on first ask)."""

    def __init__(self, items: Any) -> None:
        self._items: dict[Any, list[Any]] = defaultdict(list)
        for item in items:
            self._items[item.dep.target].append(item)
        self._done: dict[Any, dict[int, set[int]]] = {}

    def get(self, node: Any, default: Any = None) -> Any:
        if node not in self._items:
            return default
        if node not in self._done:
            roots: dict[int, set[int]] = defaultdict(set)
            for item in self._items[node]:
                for local, r in zip(item.idxs, item.root_idxs):
                    roots[local].add(r)
            self._done[node] = roots
        return self._done[node]


def _by_root(parts: list[tuple[Any, Any]], size: int) -> tuple[tuple[int, ...], ...]:
    """Per root index ``0..size-1``: the sorted local indices mapped to it by ``parts`` ((root indices,
    local indices) of Torch-Pruning's items), each once."""
    roots = torch.tensor([int(r) for rs, _ in parts for r in rs], dtype=torch.long)
    local = torch.tensor([int(i) for _, ls in parts for i in ls], dtype=torch.long)
    if not len(roots):
        return ((),) * size
    span = int(local.max()) + 1
    pairs = torch.unique(roots * span + local)  # sorted: by root, then local; each pair once
    counts = torch.bincount(pairs // span, minlength=size).tolist()
    values = (pairs % span).tolist()
    out, at = [], 0
    for n in counts[:size]:
        out.append(tuple(values[at : at + n]))
        at += n
    return tuple(out)


def _self_coupled(name: str, node: Any, roots_at: _RootsAt) -> str | None:
    """Why a channelwise layer's channels cannot go root by root, or None.

    Channel i of a channelwise layer (a depthwise conv) is channel i of its input: both must belong to the
    same root channels. GhostNet concatenates a conv's output with a depthwise conv of it (``cat([x1,
    cheap(x1)])``): Torch-Pruning gives ``cheap``'s channel i the root of concatenated channel ``n + i``
    and its input the root of ``i``, so removing one root would take a channel from one and not the other."""
    mine = roots_at.get(node, {})
    for source in getattr(node, "inputs", ()):
        theirs = roots_at.get(source)
        if theirs is None:
            continue
        for local, roots in mine.items():
            if local in theirs and theirs[local] != roots:
                return (
                    f"{name} reads and writes channels of one group under different indices (a concatenation of "
                    f"a layer's output with a depthwise conv of it){_ONE_BY_ONE}"
                )
    return None


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
