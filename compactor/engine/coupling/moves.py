"""The label tracer's ops that move or copy elements (view, permute, cat, chunk, getitem, pad, roll...):
each is replayed on the label tensors, so the index map of any chain of them is exact by construction; a
cut along a dimension where channels vary (a chunk, split, slice or index) becomes a member with its
pieces, holding the channels whose positions the forward code fixes."""

from __future__ import annotations

import linecache
import os
import re
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ...util import COMPACTOR_DIR, TORCH_DIR
from .groups import Kind, SizeSource, equal_pieces
from .ops import Labels, _arg, _per_index, _tensors, _unique, _unite_split, _varies
from .trace import _LabelStore, _replay


class _Moves(_LabelStore):
    """The tracer's handlers for ops in ``_MOVE``."""

    def _substitute(self, value: Any) -> Any:
        """The op's arguments with every tensor replaced by its labels (-1 for unlabelled data)."""

        def swap(a: Any) -> Any:
            if not isinstance(a, torch.Tensor):
                return a
            lab = self.labels_of(a)
            return lab if lab is not None else self._blank(a)

        return tree_map(swap, value)

    def _move(
        self, name: str, func: Any, args: Any, kwargs: Any, out: Any, labelled: dict[int, Labels]
    ) -> None:
        if name == "__setitem__":
            target = args[0]
            before = self.labels_of(target)
            before = before if before is not None else self._blank(target)
            lab = before.clone()
            value = args[2]
            vlab = self.labels_of(value) if isinstance(value, torch.Tensor) else None
            _replay(name, lab.__setitem__, args[1], vlab if vlab is not None else -1.0)  # the index stays
            self._set(target, lab)
            mask = self.labels_of(args[1])  # x[x < 0] = 0: a mask of x's own channels, element by element
            elementwise = mask is not None and args[1].dtype == torch.bool and torch.equal(mask, before)
            if target.dim() > 0 and not elementwise:  # the positions written are fixed in the code
                self._note_index(f"{name}@{self.trace.ops}", target, before, args[1], lab)
            return
        if name in ("__getitem__", "index_select"):  # the data becomes labels, the index stays as it is
            sargs, skwargs = (self._substitute(args[0]), *args[1:]), kwargs
        else:
            sargs, skwargs = self._substitute(args), self._substitute(kwargs)
        if name == "pad":
            skwargs = dict(skwargs)
            if len(sargs) > 3 or "value" in skwargs or (skwargs.get("mode", "constant") == "constant"):
                sargs = tuple(sargs[:3])
                skwargs.pop("value", None)
                skwargs["value"] = -1.0
        replayed = _replay(name, func, *sargs, **skwargs)
        for t, lab in zip(_tensors(out), _tensors(replayed)):
            self._set(t, lab if lab.dtype == torch.float64 else lab.to(torch.float64))
        if name in ("view", "reshape", "unflatten", "view_as", "reshape_as"):
            x, y = self.labels_of(args[0]), self.labels_of(_tensors(out)[0]) if _tensors(out) else None
            if x is not None and y is not None:
                _unite_split(self.trace.uf, x, y)
        if name in ("channel_shuffle", "native_channel_shuffle"):
            self._shuffle(args, kwargs)
        if name == "roll":
            self._roll(args, kwargs)
        if name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack"):
            for t in _tensors(out):
                self.trace.catted.update(
                    int(v) for v in _unique(self.labels.get(id(t), (t, self._blank(t)))[1]) if v >= 0
                )
        self._note_cut(name, func, args, kwargs, labelled)

    def _shuffle(self, args: Any, kwargs: Any) -> None:
        """``channel_shuffle(x, g)`` is ``view(b, g, c // g, ...) -> transpose -> reshape``: channel
        ``a * (c // g) + j`` goes to ``j * g + a``, which stays right only if every block loses the same
        ``j`` (see :func:`_unite_split`)."""
        x, groups = args[0], int(_arg(args, kwargs, 1, "groups", 1))
        lab = self.labels_of(x)
        if lab is not None and x.dim() >= 2 and groups > 1 and x.shape[1] % groups == 0:
            split = lab.reshape(x.shape[0], groups, x.shape[1] // groups, *x.shape[2:])
            _unite_split(self.trace.uf, lab, split)

    def _roll(self, args: Any, kwargs: Any) -> None:
        """``roll`` along channels wraps the last ``s`` (or, rolled back, the first ``s``) round: those
        move when a channel goes, so they stay (a slice member); the others keep their places."""
        x = args[0]
        lab = self.labels_of(x)
        if lab is None or x.dim() == 0:
            return
        shifts, dims = _arg(args, kwargs, 1, "shifts", 0), _arg(args, kwargs, 2, "dims", None)
        shifts = list(shifts) if isinstance(shifts, (tuple, list)) else [shifts]
        dims = list(dims) if isinstance(dims, (tuple, list)) else ([] if dims is None else [dims])
        if not dims:  # rolled flat: every position moves with any channel that goes
            if any(_varies(_per_index(lab, d)) for d in range(x.dim())):
                self._opaque(lab, "roll over the flattened tensor moves them")
            return
        for shift, dim in zip(shifts, dims):
            dim, n = int(dim) % x.dim(), x.shape[int(dim) % x.dim()]
            per, k = _per_index(lab, dim), int(shift)
            if not k or not _varies(per):
                continue
            if abs(k) >= n:  # wraps more than once: the wrap moves with the size
                wrapped = per
            else:
                wrapped = [p if (i >= n - k if k > 0 else i < -k) else set() for i, p in enumerate(per)]
            self._add_read(f"roll@{self.trace.ops}", "roll", Kind.SLICE, dim, wrapped, ())

    def _note_cut(self, name: str, func: Any, args: Any, kwargs: Any, labelled: dict[int, Labels]) -> None:
        """A chunk, split, slice or index along a dimension where channels vary: a member with its pieces."""
        if name not in (
            "chunk",
            "split",
            "tensor_split",
            "unbind",
            "__getitem__",
            "narrow",
            "select",
            "index_select",
        ):
            return
        x = args[0]
        lab = labelled.get(id(x))
        if lab is None or x.dim() == 0:
            return
        if name == "__getitem__":
            self._note_index(f"{name}@{self.trace.ops}", x, lab, args[1], lab)
            return
        # chunk(x, chunks, dim), split(x, size, dim), tensor_split(x, at, dim); the others take dim second
        dim = _arg(args, kwargs, 2 if name in ("chunk", "split", "tensor_split") else 1, "dim", 0)
        dim = int(dim) % x.dim()
        per = _per_index(lab, dim)
        if not _varies(per):
            return  # the cut runs along a dimension that holds no channels
        n = x.shape[dim]
        if name == "chunk":
            chunks = int(_arg(args, kwargs, 1, "chunks", 1))
            pieces = equal_pieces(-(-n // chunks), n)
            self._add_read(f"chunk@{self.trace.ops}", "chunk", Kind.CHUNK, dim, per, pieces)
            return
        what = {"unbind": Kind.UNBIND, "split": Kind.SPLIT, "tensor_split": Kind.SPLIT}.get(name, Kind.SLICE)
        if name == "split":
            sizes = _arg(args, kwargs, 1, "split_size_or_sections", None)
            if sizes is None:
                sizes = kwargs.get("split_size")
            pieces = _pieces(sizes, n)
            source = (self._size_source(sizes) or self._halved_source(sizes, n)) if pieces else None
            where = f"split at {source}" if source else f"split ({_caller()[0]})"
            if source is not None and source.per:  # split(x, self.expand_chs // 2): as many from each piece
                what = Kind.CHUNK
            self._add_read(f"{name}@{self.trace.ops}", where, what, dim, per, pieces, source)
            return
        self._add_read(f"{name}@{self.trace.ops}", name, what, dim, per, ())

    def _halved_source(self, sizes: Any, n: int) -> SizeSource | None:
        """For ``split(x, self.attr // k)`` cutting ``n`` channels into ``k`` equal pieces (CSPNet's
        ``self.expand_chs // 2``, read from the line of code); else None."""
        if not self.calls or type(sizes) is not int or sizes < 1:
            return None
        module = self.calls[-1]
        found = [
            (a, int(k))
            for a, k in re.findall(r"self\.(\w+)\s*//\s*(\d+)", _caller()[1])
            if type(getattr(module, a, None)) is int and getattr(module, a) == n == sizes * int(k)
        ]
        return SizeSource(self.names[id(module)], *found[0]) if len(found) == 1 else None

    def _size_source(self, sizes: Any) -> SizeSource | None:
        """The attribute of the module whose forward runs the split that holds its sizes: the very object
        (a tuple or list), or for an int the int attribute of that value (where several have it, the one the
        line of code names: ``torch.split(out, self.width, 1)``); None where there is none."""
        if not self.calls:
            return None
        module = self.calls[-1]
        found = [
            a
            for a, v in vars(module).items()
            if not a.startswith("_")
            and (v is sizes if isinstance(sizes, (tuple, list)) else type(v) is int and v == sizes)
        ]
        if len(found) > 1:
            line = _caller()[1]
            found = [a for a in found if re.search(rf"\.{re.escape(a)}\b", line)]
        return SizeSource(self.names[id(module)], found[0]) if len(found) == 1 else None

    def _note_index(self, name: str, x: torch.Tensor, lab: Labels, index: Any, written: Labels) -> None:
        """``x[index]`` read or written: per dimension it cuts where channels vary, a slice member holding
        every channel whose position the index fixes (``written``: the labels after a ``__setitem__``)."""
        cuts = _index_cuts(x, index)
        if cuts is None:
            self._opaque(lab, f"{name.split('@')[0]} indexes them in a way compactor does not follow")
            self._opaque(written, f"{name.split('@')[0]} indexes them in a way compactor does not follow")
            return
        for cut in cuts:
            per = [a | b for a, b in zip(_per_index(lab, cut.dim), _per_index(written, cut.dim))]
            if _varies(per):
                op = name.split("@")[0]
                self._add_read(name, op, Kind.SLICE, cut.dim, _held_positions(per, cut), ())


def _pieces(sizes: Any, n: int) -> tuple[int, ...]:
    """The piece sizes of ``split(x, sizes)`` along a dimension of ``n``; () for sizes this cannot read."""
    if type(sizes) is int and sizes > 0:
        return equal_pieces(sizes, n)
    if isinstance(sizes, (tuple, list)) and all(type(v) is int for v in sizes) and sum(sizes) == n:
        return tuple(sizes)
    return ()


def _caller() -> tuple[str, str]:
    """Where in the model's code the op runs (the innermost frame outside torch and compactor): ``file:line``
    and the line's text."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        file = frame.f_code.co_filename
        if not file.startswith((TORCH_DIR, COMPACTOR_DIR)):  # the model's code
            return f"{os.path.basename(file)}:{frame.f_lineno}", linecache.getline(file, frame.f_lineno)
        frame = frame.f_back
    return "the forward code", ""


@dataclass(frozen=True)
class _Cut:
    """What an index does to one dimension: keeps ``kept`` (None: an index tensor or list, whose positions
    are fixed in the code). ``safe``: the side where channels may go without moving the kept ones
    (``"after"``: past the last kept index, for bounds counted from the start; ``"before"``: before the
    first, for bounds counted from the end; ``""``: neither)."""

    dim: int
    kept: tuple[int, ...] | None
    safe: str = ""


def _index_cuts(x: torch.Tensor, index: Any) -> list[_Cut] | None:
    """The dimensions ``x[index]`` cuts (basic slices, integers, index tensors and lists); None for an
    index this cannot read."""
    items = index if isinstance(index, tuple) else (index,)

    def width(item: Any) -> int:
        if item is None or item is Ellipsis:
            return 0
        if isinstance(item, torch.Tensor) and item.dtype == torch.bool:
            return max(item.dim(), 1)
        return 1

    if sum(item is Ellipsis for item in items) > 1 or any(isinstance(item, bool) for item in items):
        return None
    consumed = sum(width(item) for item in items)
    if consumed > x.dim():
        return None
    cuts: list[_Cut] = []
    dim = 0
    for item in items:
        if item is Ellipsis:
            dim += x.dim() - consumed
            continue
        if item is None:
            continue
        n = x.shape[dim]
        if isinstance(item, slice):
            if not all(v is None or isinstance(v, int) for v in (item.start, item.stop, item.step)):
                return None
            idx = tuple(range(n)[item])
            if len(idx) != n:
                cuts.append(_Cut(dim, idx, _safe_side(item)))
        elif isinstance(item, int):
            cuts.append(_Cut(dim, (item % n,), "after" if item >= 0 else "before"))
        elif isinstance(item, (torch.Tensor, list, range)):
            cuts.extend(_Cut(d, None) for d in range(dim, dim + width(item)))
        else:
            return None
        dim += width(item)
    return cuts


def _safe_side(item: slice) -> str:
    """Which channels a literal slice leaves in place when they go: past its end if both bounds count from
    the start, before its start if both count from the end (and it takes every channel between)."""
    start, stop, step = item.start, item.stop, item.step or 1
    if step > 0 and (start is None or start >= 0) and (stop is None or stop >= 0):
        return "after"
    if step == 1 and start is not None and start < 0 and (stop is None or stop < 0):
        return "before"
    return ""


def _held_positions(per: list[set[int]], cut: _Cut) -> list[set[int]]:
    """The labels along a cut dimension whose channels cannot go: every one, but those on the safe side of
    what the cut keeps (channels there go like unread ones)."""
    if cut.kept is None or not cut.kept:
        return per
    first, last = min(cut.kept), max(cut.kept)
    return [
        set() if (cut.safe == "after" and i > last) or (cut.safe == "before" and i < first) else labels
        for i, labels in enumerate(per)
    ]
