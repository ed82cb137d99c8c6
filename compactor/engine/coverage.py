"""What the example inputs cannot show: branches on tensor values, layers no forward called, train mode.

Verification proves equality on the paths the example (and fresh) inputs take, in eval mode. Three things
can lie outside them, and each is detected while the masked model runs, then said:

* a **conversion of a tensor to a Python value** (``bool``, ``int``, ``float``, ``.item()``, ``.tolist()``,
  ``in``, an index): ``if x.mean() > 10:`` may take another branch on other inputs. Recorded with the file
  and line of the model code that converts (conversions inside torch itself are its own business);
* a **module with parameters that no forward called**: compaction leaves it exactly as it was, but a
  branch that calls it may read channels that were removed;
* **train mode**: a module that runs only when ``self.training`` (an auxiliary classifier) is traced in
  train mode too, and the channels it reads are kept; after compaction the model runs in train mode and
  its outputs must have the masked model's structure and shapes (values differ by design: dropout, batch
  statistics).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import SharedWriteError, first_line
from ..inputs import ExampleInputs, flatten_values
from ..layers import Role, Side, role_of
from ..modules import clone_module, write_guard
from ..util import COMPACTOR_DIR, TORCH_DIR, shown_path
from .coupling import ChannelGroup, Kind, Member

# transformers' attention-mask construction: its branches (``_ignore_causal_mask_sdpa``: "is the padding mask
# all ones?") choose how the mask is built from the inputs' padding mask and positions, which compaction does
# not touch; the same input takes the same side in the masked and the compacted model. Said, not warned of.
MASK_CODE = ("transformers/masking_utils.py:", "transformers/modeling_attn_mask_utils.py:")

# Tensor methods that hand a tensor's value to Python, and how a reader knows them.
_CONVERSIONS = {
    "numpy": ".numpy()",
    "nonzero": "nonzero (a shape from values)",
    "argwhere": "argwhere (a shape from values)",
    "unique": "unique (a shape from values)",
    "unique_consecutive": "unique (a shape from values)",
    "masked_select": "masked_select (a shape from values)",
    "__bool__": "bool",
    "__int__": "int",
    "__float__": "float",
    "__index__": "index",
    "__complex__": "complex",
    "item": ".item()",
    "tolist": ".tolist()",
    "__contains__": "in",
}


@dataclass
class Coverage:
    """What running a model showed: value conversions by place, and the modules called."""

    conversions: dict[str, set[str]] = field(default_factory=dict)  # "file.py:12" -> {"bool", ...}
    called: set[str] = field(default_factory=set)  # module names
    outcomes: dict[str, set[bool]] = field(default_factory=dict)  # "file.py:12" -> the bools it gave
    # ids of the parameters torch functions were given: a module's weights may be read without calling it
    # (tied embeddings, ``nn.MultiheadAttention``'s ``out_proj`` read by the functional attention)
    read: set[int] = field(default_factory=set)

    def branches(self) -> list[str]:
        """``"file.py:12 (bool)"`` per place, in order of file and line; a place that only converts to bool
        and gave both True and False is left out: the runs took both sides of its branch."""
        return [
            f"{where} ({', '.join(sorted(kinds))})"
            for where, kinds in sorted(self.conversions.items())
            if not (kinds == {"bool"} and self.outcomes.get(where) == {True, False})
        ]

    def one_sided(self) -> set[str]:
        """The places that only convert to bool and gave one outcome so far (their other side unverified)."""
        return {
            where
            for where, kinds in self.conversions.items()
            if kinds == {"bool"} and len(self.outcomes.get(where, ())) == 1
        }

    def snapshot(self) -> dict[str, set[bool]]:
        """The outcomes so far, to :meth:`restore` where runs turn out not to be verified."""
        return {where: set(seen) for where, seen in self.outcomes.items()}

    def restore(self, outcomes: dict[str, set[bool]]) -> None:
        self.outcomes = outcomes


class _Conversions(TorchFunctionMode):
    def __init__(self, coverage: Coverage) -> None:
        super().__init__()
        self.coverage = coverage

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        for a in (*args, *(kwargs or {}).values()):
            if isinstance(a, nn.Parameter):
                self.coverage.read.add(id(a))
            elif isinstance(a, (list, tuple)):
                self.coverage.read.update(id(t) for t in a if isinstance(t, nn.Parameter))
        kind = _CONVERSIONS.get(getattr(func, "__name__", ""))
        where = _model_code() if kind is not None else None
        if kind is not None and where is not None:
            self.coverage.conversions.setdefault(where, set()).add(kind)
        result = func(*args, **(kwargs or {}))
        if kind == "bool" and where is not None and isinstance(result, bool):
            self.coverage.outcomes.setdefault(where, set()).add(result)
        return result


def _model_code() -> str | None:
    """``file:line`` of the code that asked for the conversion, or None when torch or compactor did."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back  # type: ignore[assignment]  # f_back is None only past the outermost frame
    if frame is None or frame.f_code.co_filename.startswith((TORCH_DIR, COMPACTOR_DIR)):
        return None  # torch's own, or compactor's (a finiteness check between the forwards)
    return f"{shown_path(frame.f_code.co_filename)}:{frame.f_lineno}"


@contextmanager
def watch(model: nn.Module) -> Iterator[Coverage]:
    """Record the value conversions and module calls of every forward run inside the block."""
    coverage = Coverage()
    names = {m: n for n, m in model.named_modules()}

    def called(module: nn.Module, args: Any) -> None:
        coverage.called.add(names[module])

    hooks = [m.register_forward_pre_hook(called) for m in names]
    try:
        with _Conversions(coverage):
            yield coverage
    finally:
        for h in hooks:
            h.remove()


def uncalled_layers(model: nn.Module, called: set[str], read: Collection[int] = ()) -> list[tuple[str, str]]:
    """Modules holding parameters of their own that no forward called and whose parameters no forward read
    (``read``: ids of parameters given to torch functions; a tied embedding's weight is read through the
    embedding that is called): (name, type name)."""
    return [
        (name, type(m).__name__)
        for name, m in model.named_modules()
        if name not in called
        and any(True for _ in m.parameters(recurse=False))
        and not all(id(p) in read for p in m.parameters(recurse=False))
    ]


def train_outputs(model: nn.Module, inputs: ExampleInputs) -> tuple[Any, Coverage] | str:
    """The model's outputs on ``inputs`` in train mode, run on a copy (batch statistics and dropout must not
    touch ``model``), and what the run covered; or why train mode cannot run on these inputs."""
    try:
        try:  # on a clone that shares the parameters (buffers copied), refusing writes into them
            return _train_run(clone_module(model, share_parameters=True), inputs, list(model.parameters()))
        except SharedWriteError:  # it writes its parameters (data-dependent init): on a copy of everything
            return _train_run(clone_module(model), inputs, [])
    except Exception as e:  # the model's own train-mode code (BatchNorm on one value per channel...)
        return f"{type(e).__name__}: {first_line(e)}"


def _train_run(copy: nn.Module, inputs: ExampleInputs, guarded: list[nn.Parameter]) -> tuple[Any, Coverage]:
    copy.train()
    with write_guard(guarded, "the train-mode forward"), watch(copy) as coverage, torch.no_grad():
        out = copy(*inputs.args, **inputs.kwargs)
    return out, coverage


def train_inputs(inputs: ExampleInputs) -> list[ExampleInputs]:
    """The inputs to try train mode on: the example, then (for a batch of one, where BatchNorm has one value
    per channel to normalise) the example twice over."""
    tensors = [*inputs.args, *inputs.kwargs.values()]
    if tensors and all(t.dim() > 0 and t.shape[0] == 1 for t in tensors):
        return [inputs, inputs.repeated(2)]
    return [inputs]


def structure(outputs: Any) -> list[tuple[str, tuple[int, ...] | str]]:
    """Every output's path and shape (tensors) or type (plain values): what train mode must keep."""
    return [
        (n, tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__)
        for n, v in flatten_values(outputs, caches=False)
    ]


def hold_train_only(
    model: nn.Module, groups: list[ChannelGroup], train_groups: list[ChannelGroup], train_only: set[str]
) -> list[ChannelGroup]:
    """``groups`` (traced in eval mode), where the same layers, traced in train mode, are coupled to a module
    that runs only in train mode. A train-only layer that only reads the group's channels (an auxiliary
    classifier, its BatchNorm) rides along (:attr:`Kind.PASSENGER`): it loses the channels that go, so the
    train-mode forward still fits, and eval mode, which never runs it, is unchanged. A group whose channels
    a train-only module writes, or that the train-mode trace couples otherwise, is held whole."""
    by_root = {(g.root, g.size): g for g in train_groups}
    readers: dict[tuple[str, Any], set[str]] = {}
    for g in train_groups:
        extra = {m.name for m in g.layers() if m.name in train_only}
        if extra:
            for m in g.layers():
                readers.setdefault((m.name, m.side), set()).update(extra)
    out = []
    for g in groups:
        found = sorted({r for m in g.layers() for r in readers.get((m.name, m.side), ())})
        if found:
            riders = _passengers(model, g, by_root.get((g.root, g.size)), set(found))
            if riders is None:
                why = f"{', '.join(found[:3])} reads these channels and runs only in train mode"
                g = replace(g, held=(*g.held, why))
            else:
                g = replace(g, members=(*g.members, *riders))
        out.append(g)
    return out


def _passengers(
    model: nn.Module, group: ChannelGroup, train: ChannelGroup | None, found: set[str]
) -> tuple[Member, ...] | None:
    """The train-only members of ``train`` (the same root traced in train mode) as passengers of ``group``,
    or None where they cannot ride: no such train group, a train-only layer that writes the channels, or
    train mode coupling the group's layers otherwise."""
    if train is None:
        return None
    eval_layers = {(m.name, m.side, m.idxs) for m in group.layers()}
    riders = []
    for m in train.layers():
        if m.name in found:
            if m.side is not Side.IN and role_of(model.get_submodule(m.name)) is not Role.CHANNELWISE:
                return None  # it writes the channels: removing them changes what train mode computes
            riders.append(replace(m, kind=Kind.PASSENGER))
        elif (m.name, m.side, m.idxs) not in eval_layers:
            return None
    return tuple(riders) if {m.name for m in riders} == found else None


@dataclass(frozen=True)
class Paths:
    """What the example inputs did not show, for the report and ``--strict``."""

    branches: tuple[str, ...]  # "file.py:12 (bool)": conversions of tensors to Python values
    uncalled: tuple[tuple[str, str], ...]  # (name, type): layers with parameters no forward called
    train_only: frozenset[str]  # modules called only in train mode
    train: (
        tuple[tuple[str, tuple[int, ...] | str], ...] | str
    )  # train-mode output structure, or why it did not run
    train_inputs: ExampleInputs | None = None  # what train mode ran on
    mask_branches: tuple[str, ...] = ()  # the same in transformers' attention-mask code (MASK_CODE)

    def unproven(self) -> list[str]:
        """One line per kind of path that verification cannot prove (``--strict`` refuses each)."""
        lines = []
        if self.branches:
            more = f" and {len(self.branches) - 3} more" if len(self.branches) > 3 else ""
            lines.append(
                f"the forward converts tensors to Python values at {', '.join(self.branches[:3])}{more}: on other "
                f"inputs it may take a path the example inputs did not, which was not verified"
            )
        if self.uncalled:
            more = f" and {len(self.uncalled) - 3} more" if len(self.uncalled) > 3 else ""
            lines.append(
                f"{len(self.uncalled)} layer(s) with parameters were not called by any forward on the example inputs "
                f"({', '.join(_named(self.uncalled[:3]))}{more}): left exactly as they were, but a path that calls them "
                f"was not verified"
            )
        return lines

    def warnings(self) -> list[str]:
        lines = [f"{line} (--strict refuses this)" for line in self.unproven()]
        if isinstance(self.train, str):
            lines.append(
                f"train mode does not run on the example inputs ({self.train}): train-mode paths were not checked"
            )
        return lines

    def notes(self) -> list[str]:
        """What the report says about the branches that are not warned of (:data:`MASK_CODE`)."""
        if not self.mask_branches:
            return []
        return [
            f"transformers' attention-mask code branches on the padding mask and positions at "
            f"{', '.join(self.mask_branches)}: they read the inputs only, never an activation, so compaction "
            f"cannot change which way they go"
        ]

    def to_dict(self) -> dict[str, Any]:
        train = self.train if isinstance(self.train, str) else "outputs' structure and shapes checked"
        return {
            "value_branches": list(self.branches),
            "mask_branches": list(self.mask_branches),
            "uncalled_layers": _named(self.uncalled),
            "train_only_layers": sorted(self.train_only),
            "train_mode": train,
        }


def _named(layers: tuple[tuple[str, str], ...]) -> list[str]:
    return [f"{name} ({kind})" for name, kind in layers]


def find_paths(masked: nn.Module, seen: Coverage, inputs: ExampleInputs) -> Paths:
    """The paths of ``masked`` that the eval-mode runs recorded in ``seen`` did not take: the run in
    train mode (on a copy) adds its own conversions and calls."""
    trained: tuple[Any, Coverage] | str = "no inputs"
    for candidate in train_inputs(inputs):
        trained = train_outputs(masked, candidate)
        if not isinstance(trained, str):
            inputs = candidate
            break
    called, conversions, read = set(seen.called), dict(seen.conversions), set(seen.read)
    train_only: set[str] = set()
    if not isinstance(trained, str):
        _, coverage = trained
        train_only = coverage.called - seen.called
        called |= coverage.called
        read |= coverage.read
        for where, kinds in coverage.conversions.items():
            conversions.setdefault(where, set()).update(kinds)
    # both sides of a branch count where the verified (eval-mode) runs took them
    branches = Coverage(conversions, outcomes=seen.outcomes).branches()
    return Paths(
        branches=tuple(b for b in branches if not b.startswith(MASK_CODE)),
        mask_branches=tuple(b for b in branches if b.startswith(MASK_CODE)),
        uncalled=tuple(uncalled_layers(masked, called, read)),
        train_only=frozenset(train_only),
        train=trained if isinstance(trained, str) else tuple(structure(trained[0])),
        train_inputs=inputs,
    )


def check_train_mode(paths: Paths, small: nn.Module) -> str | None:
    """Why the compacted model's train-mode outputs do not have the masked model's structure, or None."""
    if isinstance(paths.train, str) or paths.train_inputs is None:
        return None
    trained = train_outputs(small, paths.train_inputs)
    if isinstance(trained, str):
        return f"in train mode the compacted model fails: {trained}"
    got = tuple(structure(trained[0]))
    if got != paths.train:
        diff = next(
            (f"{a} vs {b}" for a, b in zip(got, paths.train) if a != b),
            f"{len(got)} vs {len(paths.train)} outputs",
        )
        return f"in train mode the compacted model's outputs differ in structure ({diff})"
    return None
