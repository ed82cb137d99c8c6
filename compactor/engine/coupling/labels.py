"""Channel coupling derived by compactor itself: every channel gets a label, and labels travel with the data.

Torch-Pruning's index mappings are wrong or missing for the ops that move channels around: ``chunk`` and
``split`` (C2f, CSP, gated MLPs), ``permute``/``transpose`` to channels-last and back, a flatten after a
permute, a channel shuffle (``view -> transpose -> reshape``), a literal slice. Here nothing is mapped by
rule. The forward runs once under a :class:`~torch.overrides.TorchFunctionMode`; beside every tensor it
keeps a *label tensor* of the same shape (float64, exact integers; -1: no channel). A layer that writes
channels gives each output channel a fresh label; an op that only moves data (view, reshape, permute,
cat, chunk, getitem, pad, roll...) is replayed on the label tensors, so the index map of any chain of such
ops is exact by construction. Elementwise ops (``add``, ``mul``, ``where``) unite the labels that meet at
the same element (a residual add couples two layers' channels), and so does a layer reading one input
channel (a Linear after a flatten reads spatial copies of one channel). Labels are unioned with a
union-find, so the analysis always settles, in one pass.

What is not understood is never passed through: an op that reads across a dimension where labels vary (a
mean over channels, a matmul, a softmax over channels, any op not listed here) marks those labels
*opaque*, and their channels are kept with the op's name. Verification stays the judge.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import nn

from ...errors import CouplingUnfollowed, first_line
from ...inputs import ExampleInputs, flatten_outputs
from ...layers import Side
from ...util import eval_mode_restored
from .groups import ChannelGroup, Join, Kind, Member, norm_after
from .ops import Labels, _UnionFind, _unique
from .trace import _Read, _Trace
from .tracer import _LabelMode


def label_groups(model: nn.Module, inputs: ExampleInputs, *, train: bool = False) -> list[ChannelGroup]:
    """Trace ``model`` on ``inputs`` with channel labels and return one group per mixing layer's channels
    not already in an earlier group (the same shape of answer as :func:`.build_groups`)."""
    tracer = _LabelMode(model)
    try:
        with torch.no_grad(), eval_mode_restored(model), tracer.hooks():
            model.train(train)
            with tracer:
                out = model(*inputs.args, **inputs.kwargs)
    except Exception as e:
        failed = tracer.failed_op
        if failed is None or not _caused_by(e, failed[1]):
            raise  # not an op of the model: compactor's own bookkeeping, a bug to see
        raise CouplingUnfollowed(
            f"{failed[0]} fails under the label trace ({first_line(e, with_type=True)})"
        ) from e
    for _, t in flatten_outputs(out):
        lab = tracer.labels_of(t)
        if lab is not None:
            tracer.trace.outputs.update(int(v) for v in _unique(lab) if v >= 0)
    return _groups(model, tracer.trace)


def _groups(model: nn.Module, trace: _Trace) -> list[ChannelGroup]:
    uf = trace.uf
    members_by_class: dict[int, list[tuple[int, int]]] = defaultdict(list)  # class -> (read number, index)
    reads = list(trace.reads)
    for name, lab in trace.params.items():
        read = _param_read(name, lab, uf)
        if read is None:
            trace.opaque.update(
                {
                    int(v): f"{name} holds them in a layout compactor cannot slice"
                    for v in lab.flatten().tolist()
                }
            )
        else:
            reads.append(read)
    for n, read in enumerate(reads):
        for i, labels in enumerate(read.labels):
            for c in {uf.find(v) for v in labels}:
                members_by_class[c].append((n, i))
    opaque = {uf.find(v): why for v, why in trace.opaque.items()}
    sized = {uf.find(v): why for v, why in trace.sized.items()}
    outputs = {uf.find(v) for v in trace.outputs}
    norms = norm_after(model, _single_readers(trace))
    joins = [
        (op, [{uf.find(v) for v in operand} for operand in operands], operands)
        for op, operands in trace.joins
    ]
    covered: set[int] = set()
    groups: list[ChannelGroup] = []
    for name, fresh in trace.producers:
        classes = [uf.find(v) for v in fresh]
        if all(c in covered for c in classes) or any(g.root == name for g in groups):
            continue
        roots: list[int | None] = []
        for c in classes:  # a class met twice (a gated MLP's two halves) is the first one's root channel
            roots.append(None if c in covered else c)
            covered.add(c)
        group = _group(name, roots, reads, members_by_class, opaque, outputs, norms, sized)
        groups.append(replace(group, joins=_joins_of(roots, joins, trace)))
    return groups


def _group(
    root: str,
    roots: list[int | None],
    reads: list[_Read],
    members_by_class: dict[int, list[tuple[int, int]]],
    opaque: dict[int, str],
    outputs: set[int],
    norms: dict[str, str],
    sized: dict[int, str],
) -> ChannelGroup:
    idxs: dict[int, list[list[int]]] = {}
    for r, c in enumerate(roots):
        if c is None:
            continue
        for n, i in members_by_class.get(c, []):
            if n not in idxs:
                idxs[n] = [[] for _ in roots]
            idxs[n][r].append(i)
    members = []
    for n, per_root in sorted(idxs.items()):
        read = reads[n]
        members.append(
            Member(
                read.name,
                read.op,
                read.side,
                read.kind,
                read.dim,
                tuple(tuple(sorted(set(p))) for p in per_root),
                read.pieces,
                read.source,
            )
        )
    why = {r: opaque[c] for r, c in enumerate(roots) if c is not None and c in opaque}
    reaches = any(c in outputs for c in roots if c is not None)
    at_output = tuple(r for r, c in enumerate(roots) if c is not None and c in outputs)
    layers = {m.name for m in members if m.kind is Kind.LAYER}
    return ChannelGroup(
        root,
        len(roots),
        tuple(_merge_sides(members)),
        reaches,
        (),
        norm_after=tuple((a, b) for a, b in norms.items() if a in layers),
        exact=True,
        opaque=tuple(sorted(why.items())),
        at_output=at_output,
        sized=tuple((r, sized[c]) for r, c in enumerate(roots) if c is not None and c in sized),
    )


def _joins_of(
    roots: list[int | None], joins: list[tuple[str, list[set[int]], list[set[int]]]], trace: _Trace
) -> tuple[Join, ...]:
    """The elementwise ops where this group's channels from two or more operands meet: per operand, the
    group's writing layers whose labels reach it, and which of them came through a concatenation."""
    mine = {c for c in roots if c is not None}
    found = []
    for op, classes, labels in joins:
        hit = [bool(c & mine) for c in classes]
        if sum(hit) < 2:
            continue
        operands = []
        through = set()
        for labs in labels:
            writers = {trace.owner[v] for v in labs if v in trace.owner and trace.uf.find(v) in mine}
            through |= {
                trace.owner[v]
                for v in labs
                if v in trace.owner and v in trace.catted and trace.uf.find(v) in mine
            }
            operands.append(tuple(sorted(writers)))
        join = Join(op, tuple(operands), tuple(sorted(through)))
        if join not in found:
            found.append(join)
    return tuple(sorted(found, key=lambda j: (sum(map(len, j.operands)), j.operands)))


def _merge_sides(members: list[Member]) -> list[Member]:
    """One member per (name, side): a layer read twice (``cat([x, x])``) holds both indices per channel."""
    merged: dict[tuple[str, Side], Member] = {}
    for m in members:
        key = (m.name, m.side)
        if key in merged:
            old = merged[key]
            idxs = tuple(tuple(sorted(set(a) | set(b))) for a, b in zip(old.idxs, m.idxs))
            merged[key] = replace(old, idxs=idxs)
        else:
            merged[key] = m
    return list(merged.values())


def _param_read(name: str, lab: Labels, uf: _UnionFind) -> _Read | None:
    """A bare parameter's channels: the one dimension along which its elements' classes change and
    across which they do not (a LayerScale ``gamma``, a class token's features). None if there is none
    (and its elements are coupled to something); a parameter coupled to nothing is not a member."""
    classes = lab.clone()
    flat = classes.view(-1)
    for i, v in enumerate(lab.flatten().tolist()):
        flat[i] = uf.find(int(v))
    for d in range(lab.dim()):
        if lab.shape[d] > 1 and _constant_along_others(classes, d):
            return _Read(
                name, "Parameter", Side.OUT, Kind.LAYER, d, [{int(v)} for v in _first_line(classes, d)]
            )
    if lab.numel() == 1:
        return _Read(name, "Parameter", Side.OUT, Kind.LAYER, 0, [{int(flat[0])}])
    return None


def _constant_along_others(classes: Labels, d: int) -> bool:
    moved = classes.movedim(d, 0).reshape(classes.shape[d], -1)
    return bool((moved == moved[:, :1]).all())


def _first_line(classes: Labels, d: int) -> list[float]:
    return classes.movedim(d, 0).reshape(classes.shape[d], -1)[:, 0].tolist()


def _single_readers(trace: _Trace) -> Iterator[tuple[str, str]]:
    """(layer, the layer that reads its output) for each layer whose one output tensor is read once, by a
    layer: the edges :func:`~.groups.norm_after` looks at."""
    for name, ids in trace.feeds.items():
        if len(ids) == 1 and trace.uses.get(ids[0], 0) == 1 and len(trace.read_by.get(ids[0], [])) == 1:
            yield name, trace.read_by[ids[0]][0]


def _caused_by(e: BaseException, cause: BaseException) -> bool:
    """Whether ``e`` is ``cause`` or was raised while handling it (its ``__cause__``/``__context__`` chain)."""
    seen: set[int] = set()
    at: BaseException | None = e
    while at is not None and id(at) not in seen:
        if at is cause:
            return True
        seen.add(id(at))
        at = at.__cause__ or at.__context__
    return False
