"""Attention heads: remove the heads of multi-head attention that provably contribute nothing, or a constant.

Channel groups (``graph``/``plan``) cannot shrink attention: Torch-Pruning treats the attention op as
elementwise and couples ``query``/``key``/``value``/output channels one by one, but a single channel cannot
leave a head without changing the ``view(..., -1, head_size)`` split (:func:`head_layers` names those
layers so that the plan can keep them). A whole head can go, exactly, when

* its value rows (``W_v[head]``) and value bias are zero: the head outputs 0 for every token;
* its value rows are zero but its value bias ``b_v`` is not: every token receives ``softmax_row @ b_v = b_v``
  because a softmax row sums to 1. Its contribution to the output projection is the constant
  ``W_o[:, head] @ b_v``, folded into the output projection's bias. This holds as long as every query sees at
  least one key: Hugging Face masks padding additively (eager: ``finfo.min``) or with a boolean mask (SDPA),
  and SDPA returns 0, not ``b_v``, for a row whose keys are *all* masked (a sequence made only of padding).
  ``fold_constant_heads=False`` keeps such heads for inputs like that;
* the output projection ignores it (``W_o[:, head]`` all zero), whatever it computes.

A head whose key rows are zero (or query rows and query bias) but whose values are not is *not* removable:
its scores are the same for every key, so it attends uniformly, and a uniform average of the values still
depends on the input. It is kept, and reported with that reason.
Every layer keeps at least one head (``view(..., -1, head_size)`` cannot split an empty tensor).

The layouts (:data:`LAYOUTS`) are read through the attributes their ``forward`` uses: separate
``query``/``key``/``value`` with the output projection ``output.dense`` on the parent (BERT family);
``q_proj``/``k_proj``/``v_proj`` with ``o_proj``/``out_proj`` (ViT, CLIP, OPT, BART; with
``num_key_value_groups``: grouped-query decoders, Llama to Gemma, where the unit is a whole key/value group
with its query heads); DistilBERT's ``q_lin``; T5's ``q``/``k``/``v``/``o``; and fused projections: GPT-2's
``c_attn`` (a Conv1D), Falcon's three packings and GPT-NeoX's ``query_key_value``, Phi-3's ``qkv_proj``
(:class:`Packing`). The counts each forward reads follow (:attr:`Layout.counts`); Phi-3 reads
``self.config.num_attention_heads``, so a layer that loses heads gets a config of its own
(:func:`compactor.util.set_count`). T5's layers of a stack add one position bias that the first computes:
they lose only the heads all of them lose (:attr:`Layout.tie`), with its ``relative_attention_bias`` column.

Consequences for callers: ``output_attentions=True`` returns maps for the remaining heads only; a
``StaticCache`` (decoders), which preallocates from the config, does not fit; and the result reloads with
``torch.load`` of the whole module or :func:`compactor.load` of a written directory, not ``from_pretrained``
(its manifest records the counts). Verification stays the judge: run the model's outputs against the
masked model after :func:`compact_heads`, as ``compact`` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from ..inputs import ExampleInputs, run
from ..layers import Role, Side, role_of, shrinker_for, width
from ..modules import baked, own_parameters
from ..outputs import Outputs, compare
from ..util import eval_mode_restored, get_count, set_count


class HeadFate(str, Enum):
    REMOVED = "removed"  # outputs exactly zero, or the output projection ignores it
    FOLDED = "folded"  # outputs a constant, folded into the output projection's bias
    KEPT_UNIFORM = "kept: attends uniformly"  # query/key zero, values not: still averages the input
    KEPT_MIN_ONE = "kept: layer needs a head"
    KEPT_NO_PAIRING = "kept: no output projection found"
    KEPT_FOLDING_OFF = "kept: fold_constant_heads=False"
    KEPT_UNVERIFIED = "kept: verification failed"
    KEPT_LAYOUT = "kept: heads tied across layers"

    @property
    def removed(self) -> bool:
        return self in (HeadFate.REMOVED, HeadFate.FOLDED)


@dataclass(frozen=True)
class HeadDecision:
    head: int
    fate: HeadFate
    reason: str


@dataclass(frozen=True)
class HeadChange:
    """What happened to the zeroed heads of one attention module."""

    layer: str  # the attention module (the one holding query/key/value)
    heads_before: int
    heads_after: int
    removed: tuple[int, ...]  # head indices of the dense model, removed or folded
    reason: str  # one line: what was removed and kept, and why
    decisions: tuple[HeadDecision, ...] = ()  # every head that had a zero pattern
    query_heads: tuple[int, int] | None = (
        None  # grouped-query attention: query heads per group, before, after
    )

    @property
    def changed(self) -> bool:
        """Whether the layer lost heads: whole units, or query heads within their groups."""
        return bool(self.removed) or (
            self.query_heads is not None and self.query_heads[1] < self.query_heads[0]
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decisions"] = [{"head": x.head, "fate": x.fate.value, "reason": x.reason} for x in self.decisions]
        return d


class Packing(str, Enum):
    """Where each head's rows lie in the projections that write queries, keys and values."""

    SEPARATE = "separate"  # one layer each for q, k and v
    BLOCKS = "blocks"  # one fused layer: all query heads, then all key heads, then all value heads
    PER_UNIT = "per unit"  # one fused layer: per key/value head, its query heads, its key, its value


@dataclass(frozen=True)
class Shape:
    """How one attention module splits into heads: ``units`` key/value heads (without grouped-query
    attention: the heads), each read by ``group`` query heads of ``head_dim`` features."""

    units: int
    group: int
    head_dim: int


@dataclass(frozen=True)
class Layout:
    """One family of attention modules: the attributes its ``forward`` reads, how its heads are packed, and
    which of its attributes count heads (kept in step when heads go)."""

    name: str
    q: str
    k: str
    v: str  # the same attribute for a fused projection
    o_attrs: tuple[str, ...]  # output projection on the module itself; empty: ``output.dense`` on the parent
    shape: Callable[[nn.Module, int, int], Shape | str]  # (module, q rows, k rows) -> its heads, or why not
    counts: Callable[[Shape], dict[str, int]]  # the attributes that count heads, for a shape
    packing: Packing = Packing.SEPARATE
    requires: tuple[str, ...] = ()  # further int attributes the module must have
    refuse: Callable[[nn.Module], str | None] = lambda m: None  # why its heads cannot go, if they cannot
    when: Callable[[nn.Module], bool] = lambda m: True  # the module's flags choose this packing
    grouped: bool = False  # a unit is a key/value head with its query heads (query heads may go within it)
    tie: Callable[[str], str] | None = None  # site name -> key: sites of one key lose the same heads
    tie_reason: str = ""  # why they must (said for a head some of them keep)
    per_head: tuple[str, ...] = ()  # layers on the module with one output column per head (a position bias)

    def count_attrs(self) -> tuple[str, ...]:
        """Every attribute :attr:`counts` may set."""
        return tuple(self.counts(Shape(2, 2, 2)))


def _flag(module: nn.Module, name: str) -> bool:
    return bool(getattr(module, name, False))


def _ints(module: nn.Module, *attrs: str) -> tuple[int, ...] | None:
    values = tuple(getattr(module, a, None) for a in attrs)
    return values if all(isinstance(v, int) and not isinstance(v, bool) for v in values) else None  # type: ignore[return-value]


def _plain(heads_attr: str, dim_attr: str) -> Callable[[nn.Module, int, int], Shape | str]:
    """Multi-head attention without key/value groups: ``heads_attr`` heads of ``dim_attr`` features."""

    def shape(module: nn.Module, q: int, k: int) -> Shape | str:
        found = _ints(module, heads_attr, dim_attr)
        assert found is not None
        heads, head_dim = found
        if getattr(module, "num_key_value_groups", 1) != 1:
            return "grouped-query attention (num_key_value_groups > 1) is not compacted"
        if heads * head_dim != q or k != q:
            return f"{heads_attr}={heads} x {dim_attr}={head_dim} does not give its {q} query and {k} key features"
        return Shape(heads, 1, head_dim)

    return shape


def _grouped(module: nn.Module, q: int, k: int) -> Shape | str:
    """Grouped-query attention (Llama, Mistral, Qwen, Gemma): key/value heads from the key width, each read by
    ``num_key_value_groups`` query heads."""
    found = _ints(module, "num_key_value_groups", "head_dim")
    assert found is not None
    group, head_dim = found
    if group < 1 or head_dim < 1 or k % head_dim or q != k * group:
        return f"query/key widths {q}/{k} do not split into num_key_value_groups={group} groups of head_dim={head_dim}"
    return Shape(k // head_dim, group, head_dim)


def _packed(per_head: int) -> Callable[[nn.Module, int, int], Shape | str]:
    """GPT-NeoX: one fused projection of ``per_head`` x ``head_size`` rows per head (query, key, value)."""

    def shape(module: nn.Module, q: int, k: int) -> Shape | str:
        found = _ints(module, "head_size")
        assert found is not None
        (head_dim,) = found
        if head_dim < 1 or q % (per_head * head_dim):
            return f"query_key_value's {q} rows do not split into heads of 3 x head_size={head_dim}"
        return Shape(q // (per_head * head_dim), 1, head_dim)

    return shape


def _fused_grouped(module: nn.Module, q: int, k: int) -> Shape | str:
    """Phi-3: one fused projection of all query heads, then ``num_key_value_heads`` keys and as many values."""
    found = _ints(module, "num_key_value_groups", "num_key_value_heads", "head_dim")
    assert found is not None
    group, kv, head_dim = found
    if group < 1 or kv < 1 or q != (kv * group + 2 * kv) * head_dim:
        return f"qkv_proj's {q} rows do not split into num_key_value_heads={kv} groups of {group} query heads"
    return Shape(kv, group, head_dim)


def _gpt2(module: nn.Module, q: int, k: int) -> Shape | str:
    found = _ints(module, "num_heads", "head_dim", "split_size")
    assert found is not None
    heads, head_dim, split = found
    if hasattr(module, "q_attn") or getattr(module, "is_cross_attention", False):
        return "cross-attention (q_attn) is not compacted"
    if heads * head_dim != split or q != 3 * split:
        return (
            f"c_attn's {q} rows are not 3 x split_size={split} = 3 x num_heads={heads} x head_dim={head_dim}"
        )
    return Shape(heads, 1, head_dim)


def _falcon(module: nn.Module, q: int, k: int) -> Shape | str:
    """Falcon's three packings (``new_decoder_architecture``, ``multi_query``, per head), told apart in
    :func:`_falcon_layout`; ``q`` is the fused projection's width."""
    found = _ints(module, "num_heads", "num_kv_heads", "head_dim")
    assert found is not None
    heads, kv, head_dim = found
    if kv < 1 or heads % kv or q != (heads + 2 * kv) * head_dim:
        return f"query_key_value's {q} rows do not split into num_heads={heads}, num_kv_heads={kv} of head_dim={head_dim}"
    if getattr(module, "new_decoder_architecture", False) or getattr(module, "multi_query", False):
        return Shape(kv, heads // kv, head_dim)
    return Shape(heads, 1, head_dim)


def _falcon_refuse(module: nn.Module) -> str | None:
    config = getattr(module, "config", None)
    if getattr(config, "alibi", False):
        return (
            "ALiBi gives each head a slope from config.num_attention_heads, shared by every layer: heads kept"
        )
    return None


def _t5_stack(name: str) -> str:
    """T5's sites of one stack and kind: ``encoder.block.*.layer.0.SelfAttention``."""
    return re.sub(r"\.block\.\d+\.", ".block.*.", name)


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="bert",
        q="query",
        k="key",
        v="value",
        o_attrs=(),
        shape=_plain("num_attention_heads", "attention_head_size"),
        counts=lambda s: {"num_attention_heads": s.units, "all_head_size": s.units * s.head_dim},
        requires=("num_attention_heads", "attention_head_size"),
    ),
    Layout(
        name="distilbert",
        q="q_lin",
        k="k_lin",
        v="v_lin",
        o_attrs=("out_lin",),
        shape=_plain("n_heads", "attention_head_size"),
        counts=lambda s: {"n_heads": s.units},
        requires=("n_heads", "attention_head_size"),
    ),
    Layout(
        name="decoder",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        o_attrs=("o_proj",),
        shape=_grouped,
        counts=lambda s: {"num_key_value_groups": s.group},
        requires=("num_key_value_groups", "head_dim"),
        grouped=True,
    ),
    Layout(
        name="proj",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        o_attrs=("o_proj", "out_proj"),
        shape=_plain("num_heads", "head_dim"),
        counts=lambda s: {"num_heads": s.units},
        requires=("num_heads", "head_dim"),
    ),
    Layout(
        name="proj",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        o_attrs=("o_proj", "out_proj"),
        shape=_plain("num_attention_heads", "head_dim"),
        counts=lambda s: {"num_attention_heads": s.units},
        requires=("num_attention_heads", "head_dim"),
    ),
    Layout(
        name="gpt2",
        q="c_attn",
        k="c_attn",
        v="c_attn",
        o_attrs=("c_proj",),
        shape=_gpt2,
        counts=lambda s: {"num_heads": s.units, "split_size": s.units * s.head_dim},
        packing=Packing.BLOCKS,
        requires=("num_heads", "head_dim", "split_size"),
    ),
    Layout(
        name="falcon",
        q="query_key_value",
        k="query_key_value",
        v="query_key_value",
        o_attrs=("dense",),
        shape=_falcon,
        counts=lambda s: {
            "num_heads": s.units * s.group,
            "num_kv_heads": s.units,
            "num_key_value_groups": s.group,
        },
        packing=Packing.PER_UNIT,
        requires=("num_heads", "num_kv_heads", "head_dim"),
        refuse=_falcon_refuse,
        when=lambda m: _flag(m, "new_decoder_architecture"),
        grouped=True,
    ),
    Layout(
        name="falcon-mq",
        q="query_key_value",
        k="query_key_value",
        v="query_key_value",
        o_attrs=("dense",),
        shape=_falcon,
        counts=lambda s: {"num_heads": s.units * s.group, "num_key_value_groups": s.group},
        packing=Packing.BLOCKS,
        requires=("num_heads", "num_kv_heads", "head_dim"),
        refuse=_falcon_refuse,
        when=lambda m: _flag(m, "multi_query") and not _flag(m, "new_decoder_architecture"),
        grouped=True,
    ),
    Layout(
        name="falcon-per-head",
        q="query_key_value",
        k="query_key_value",
        v="query_key_value",
        o_attrs=("dense",),
        shape=_falcon,
        counts=lambda s: {"num_heads": s.units},
        packing=Packing.PER_UNIT,
        requires=("num_heads", "num_kv_heads", "head_dim"),
        refuse=_falcon_refuse,
        when=lambda m: (
            hasattr(m, "multi_query")
            and not _flag(m, "multi_query")
            and not _flag(m, "new_decoder_architecture")
        ),
    ),
    Layout(
        name="neox",
        q="query_key_value",
        k="query_key_value",
        v="query_key_value",
        o_attrs=("dense",),
        shape=_packed(3),
        counts=lambda s: {},
        packing=Packing.PER_UNIT,
        requires=("head_size",),
        when=lambda m: not hasattr(m, "num_heads"),  # Falcon's fused projection is read with its head counts
    ),
    Layout(
        name="phi3",
        q="qkv_proj",
        k="qkv_proj",
        v="qkv_proj",
        o_attrs=("o_proj",),
        shape=_fused_grouped,
        # its forward splits qkv_proj at self.config.num_attention_heads: a config of its own (set_count)
        counts=lambda s: {
            "num_key_value_heads": s.units,
            "num_key_value_groups": s.group,
            "config.num_attention_heads": s.units * s.group,
        },
        packing=Packing.BLOCKS,
        requires=("num_key_value_groups", "num_key_value_heads", "head_dim"),
        grouped=True,
    ),
    Layout(
        name="t5",
        q="q",
        k="k",
        v="v",
        o_attrs=("o",),
        shape=_plain("n_heads", "key_value_proj_dim"),
        counts=lambda s: {"n_heads": s.units, "inner_dim": s.units * s.head_dim},
        requires=("n_heads", "key_value_proj_dim"),
        tie=_t5_stack,
        tie_reason=(
            "T5's first layer of a stack computes one position bias per head (relative_attention_bias; zeros "
            "in cross-attention) and every layer of the stack adds it: a head goes only where every layer "
            "of the stack loses it"
        ),
        per_head=("relative_attention_bias",),
    ),
)


def _layout_matches(module: nn.Module, layout: Layout) -> bool:
    """Whether ``module`` has what ``layout`` reads: its projections (layers compactor can shrink), its int
    attributes, and the flags that choose the layout's packing."""
    if not all(role_of(getattr(module, a, None)) is Role.MIXING for a in (layout.q, layout.k, layout.v)):
        return False
    if _ints(module, *layout.requires) is None or not layout.when(module):
        return False
    return not layout.o_attrs or any(role_of(getattr(module, a, None)) is Role.MIXING for a in layout.o_attrs)


@dataclass(frozen=True)
class AttentionSite:
    """One attention module and the layers that hold its heads."""

    name: str
    module: nn.Module
    layout: Layout
    o_owner: nn.Module  # the module holding the output projection as attribute ``o``
    o: str
    o_name: str  # the output projection's full name, for reports
    head_dim: int
    num_heads: int  # units: heads, or for grouped-query attention key/value heads
    group: int = 1  # query heads per unit (grouped-query attention: num_key_value_groups)

    def _start(self, which: str, unit: int, j: int = 0) -> int:
        """The first row of unit ``unit``'s ``which`` head (query heads: its ``j``-th) in ``which``'s layer."""
        hd, g, n = self.head_dim, self.group, self.num_heads
        if which == "o" or self.layout.packing is Packing.SEPARATE:
            return (unit * g + j) * hd if which in ("q", "o") else unit * hd
        if self.layout.packing is Packing.BLOCKS:
            offset = {"q": 0, "k": n * g * hd, "v": n * g * hd + n * hd}[which]
            return offset + ((unit * g + j) * hd if which == "q" else unit * hd)
        block = unit * (g + 2) * hd  # PER_UNIT: the unit's query heads, then its key, then its value
        return block + {"q": j * hd, "k": g * hd, "v": (g + 1) * hd}[which]

    def rows(self, which: str, unit: int) -> list[int]:
        """The rows of q/k/v (columns of o) that unit ``unit`` holds: a KV group's query heads for q and o."""
        heads = range(self.group) if which in ("q", "o") else range(1)
        return [
            r
            for j in heads
            for r in range(self._start(which, unit, j), self._start(which, unit, j) + self.head_dim)
        ]

    def attr(self, which: str) -> str:
        """The attribute name of projection ``which`` ('q', 'k', 'v' on the module, 'o' on ``o_owner``)."""
        name: str = self.o if which == "o" else getattr(self.layout, which)
        return name

    def linear(self, which: str) -> nn.Module:
        owner = self.o_owner if which == "o" else self.module
        layer: nn.Module = getattr(owner, self.attr(which))
        return layer


Check = Callable[[nn.Module], str | None]  # None if the candidate reproduces the outputs, else why not


def compact_heads(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    fold_constant_heads: bool = True,
    verify: Check | None = None,
    skip: frozenset[str] = frozenset(),
) -> tuple[nn.Module, list[HeadChange]]:
    """A copy of ``model`` without the attention heads that provably contribute nothing or a constant.

    ``model`` is not modified: it is cloned and its ``torch.nn.utils.prune`` masks are baked into the copy,
    which shares the parameters it does not rebuild with ``model``.
    With ``example_inputs`` (anything :func:`compactor.compact` accepts), each BERT-style pairing of an
    attention module with its parent's ``output.dense`` is confirmed by tracing one forward pass; without
    them the pairing rests on module structure and shapes. Returns the copy and one :class:`HeadChange` per
    attention module that had a zeroed head (removed or kept).

    ``verify(candidate)``, if given, returns None when ``candidate`` reproduces the reference outputs and a
    one-line problem otherwise. A candidate that fails is retried without folding constant heads (an
    all-padding sequence under SDPA, see the module doc), then given up: the unmodified copy comes back and
    every head that would have gone is reported as ``kept: verification failed``.
    """
    folds = (
        (fold_constant_heads, False) if fold_constant_heads and verify is not None else (fold_constant_heads,)
    )
    problems: list[str] = []
    for fold in folds:
        new, changes = _compact_heads_once(model, example_inputs, fold, skip)
        if verify is None or not any(c.changed for c in changes):
            return new, changes
        problem = verify(new)
        if problem is None:
            return new, changes
        problems.append(f"{'with' if fold else 'without'} folding: {problem}")
    return baked(model), [_unverified(c, "; ".join(problems)) for c in changes]


def _compact_heads_once(
    model: nn.Module, example_inputs: Any, fold: bool, skip: frozenset[str] = frozenset()
) -> tuple[nn.Module, list[HeadChange]]:
    new = baked(model, share=True)  # what is not rebuilt stays shared with ``model``
    sites, unpaired = _find_sites(new)
    sites = [s for s in sites if s.name not in skip]  # attention no forward called: left as it was
    if example_inputs is not None:
        sites, mismatched = _confirm_pairing(new, sites, ExampleInputs.of(example_inputs))
        unpaired += mismatched
    decided = _tied(sites, [_site_decisions(site, fold) for site in sites])
    changes = [change for site, d in zip(sites, decided) if (change := _compact_site(site, d)) is not None]
    changes += [
        change for name, module, why in unpaired if (change := _unpaired(name, module, why)) is not None
    ]
    return new, sorted(changes, key=lambda c: c.layer)


def _unverified(change: HeadChange, problem: str) -> HeadChange:
    decisions = tuple(
        HeadDecision(d.head, HeadFate.KEPT_UNVERIFIED, problem) if d.fate.removed else d
        for d in change.decisions
    )
    return HeadChange(
        change.layer,
        change.heads_before,
        change.heads_before,
        (),
        _summary(list(decisions)) or f"query heads kept (verification failed: {problem})",
        decisions,
        None if change.query_heads is None else (change.query_heads[0], change.query_heads[0]),
    )


def head_layers(model: nn.Module) -> dict[tuple[str, Side], str]:
    """``(layer name, side) -> attention module name`` for every projection that holds heads.

    Query/key/value write heads (``Side.OUT``), the output projection reads them (``Side.IN``). Torch-Pruning couples q/k/v/o channel by channel (it treats the attention op as
    elementwise), but those channels can only go as whole heads, through :func:`compact_heads`: a channel
    group holding one of these (layer, side) pairs should be kept, with that reason.
    """
    sites, _ = _find_sites(model)
    found: dict[tuple[str, Side], str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for site in sites:
        for which in ("q", "k", "v"):
            found[(names[id(site.linear(which))], Side.OUT)] = site.name
        found[(site.o_name, Side.IN)] = site.name
    return found


def kept_head_rows(model: nn.Module, changes: list[HeadChange]) -> dict[tuple[str, int], str]:
    """``(q/k/v layer, row) -> why`` for the rows of every zeroed head the heads stage kept: a row-level
    reason (coupled to a live channel) says less than the head's own (the layout ties heads across layers)."""
    sites = {s.name: s for s in _find_sites(model)[0]}
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[tuple[str, int], str] = {}
    for change in changes:
        site = sites.get(change.layer)
        if site is None:
            continue
        for d in change.decisions:
            if d.fate.removed:
                continue
            why = f"its attention head ({d.head}) is {d.fate.value}: {d.reason}"
            for which in ("q", "k", "v"):
                layer = names[id(site.linear(which))]
                for row in site.rows(which, d.head):
                    found.setdefault((layer, row), why)
    return found


# --- finding attention modules ---------------------------------------------------------------------
def _find_sites(model: nn.Module) -> tuple[list[AttentionSite], list[tuple[str, nn.Module, str]]]:
    """Every recognised attention module, paired with its output projection; and those left unpaired."""
    sites: list[AttentionSite] = []
    unpaired: list[tuple[str, nn.Module, str]] = []
    parents = {
        id(child): (name, parent) for name, parent in model.named_modules() for child in parent.children()
    }
    for name, module in model.named_modules():
        found = _layout_of(module)
        if found is None:
            continue
        layout, shape = found
        if isinstance(shape, str):
            unpaired.append((name, module, shape))
            continue
        owner, o_attr, o_name = _output_projection(name, module, layout, parents)
        if owner is None:
            unpaired.append((name, module, o_name))
            continue
        reads, wanted = width(getattr(owner, o_attr), Side.IN), shape.units * shape.group * shape.head_dim
        if reads != wanted:
            unpaired.append((name, module, f"{o_name} reads {reads} features, not {wanted}"))
            continue
        sites.append(
            AttentionSite(
                name, module, layout, owner, o_attr, o_name, shape.head_dim, shape.units, shape.group
            )
        )
    return sites, unpaired


def _layout_of(module: nn.Module) -> tuple[Layout, Shape | str] | None:
    """The first layout whose attributes ``module`` has and whose shape its widths fit (else the first
    matching layout with why its widths do not fit); None where no layout matches."""
    first: tuple[Layout, Shape | str] | None = None
    for layout in LAYOUTS:
        if not _layout_matches(module, layout):
            continue
        q, k = (width(getattr(module, a), Side.OUT) for a in (layout.q, layout.k))
        shape = layout.shape(module, q or 0, k or 0)
        if isinstance(shape, Shape):
            return layout, shape
        first = first or (layout, shape)
    return first


def _output_projection(
    name: str, module: nn.Module, layout: Layout, parents: dict[int, tuple[str, nn.Module]]
) -> tuple[nn.Module | None, str, str]:
    """(owner, attribute, full name) of the output projection, or (None, "", why not found)."""
    for attr in layout.o_attrs:
        if role_of(getattr(module, attr, None)) is Role.MIXING:
            return module, attr, f"{name}.{attr}"
    if layout.o_attrs:
        return None, "", f"{name} has none of {layout.o_attrs}"
    if id(module) not in parents:
        return None, "", f"{name} has no parent module holding output.dense"
    parent_name, parent = parents[id(module)]
    output = getattr(parent, "output", None)
    if output is None or output is module or role_of(getattr(output, "dense", None)) is not Role.MIXING:
        return None, "", f"its parent {parent_name or 'model'} has no output.dense Linear"
    prefix = f"{parent_name}.output" if parent_name else "output"
    return output, "dense", f"{prefix}.dense"


def _confirm_pairing(
    model: nn.Module, sites: list[AttentionSite], inputs: ExampleInputs
) -> tuple[list[AttentionSite], list[tuple[str, nn.Module, str]]]:
    """Keep the sites whose output projection reads, as its input, the very tensor the attention returns."""
    produced: dict[str, int] = {}
    consumed: dict[str, int] = {}
    hooks = []
    for site in sites:
        if site.o_owner is site.module:
            continue  # the projection is called inside the module's own forward

        def after(_m: nn.Module, _args: Any, out: Any, key: str = site.name) -> None:
            first = out[0] if isinstance(out, (tuple, list)) else out
            produced[key] = id(first)

        def before(_m: nn.Module, args: tuple[Any, ...], key: str = site.name) -> None:
            consumed.setdefault(key, id(args[0]) if args else -1)

        hooks.append(site.module.register_forward_hook(after))
        hooks.append(site.linear("o").register_forward_pre_hook(before))
    try:  # in eval mode: no dropout, no BatchNorm statistics updated by this extra forward
        with eval_mode_restored(model), torch.no_grad():
            run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    kept, dropped = [], []
    for site in sites:
        if site.o_owner is site.module or (
            site.name in produced and produced[site.name] == consumed.get(site.name)
        ):
            kept.append(site)
        else:
            dropped.append(
                (site.name, site.module, f"{site.o_name} does not read {site.name}'s output directly")
            )
    return kept, dropped


# --- deciding and applying -------------------------------------------------------------------------
def _rows_zero(layer: nn.Module, rows: list[int]) -> bool:
    """Whether the layer's output rows ``rows`` are all zero (weights; the bias apart)."""
    shrinker = shrinker_for(layer)
    assert shrinker is not None
    return bool(shrinker.out_rows_zero(layer, torch.tensor(rows, dtype=torch.long)).all())


def _cols_zero(layer: nn.Module, cols: list[int]) -> bool:
    """Whether no output of the layer reads its input columns ``cols``."""
    shrinker = shrinker_for(layer)
    assert shrinker is not None
    return bool(shrinker.in_cols_zero(layer, torch.tensor(cols, dtype=torch.long)).all())


def _bias_zero(layer: nn.Module, rows: list[int]) -> bool:
    bias = getattr(layer, "bias", None)
    return not isinstance(bias, torch.Tensor) or bool((bias.detach()[rows] == 0).all())


def _decide(site: AttentionSite, fold: bool) -> list[HeadDecision]:
    q, k, v, o = (site.linear(w) for w in ("q", "k", "v", "o"))
    decisions = []
    for h in range(site.num_heads):
        q_rows, k_rows, v_rows = site.rows("q", h), site.rows("k", h), site.rows("v", h)
        v_zero = _rows_zero(v, v_rows)
        q_zero = _rows_zero(q, q_rows) and _bias_zero(q, q_rows)
        uniform = _rows_zero(k, k_rows) or q_zero  # every key gets the same score
        if _cols_zero(o, site.rows("o", h)):
            decisions.append(HeadDecision(h, HeadFate.REMOVED, f"{site.o_name} ignores it (zero columns)"))
        elif v_zero and _bias_zero(v, v_rows):
            decisions.append(
                HeadDecision(h, HeadFate.REMOVED, "outputs exactly zero (value rows and bias zero)")
            )
        elif v_zero and fold:
            decisions.append(
                HeadDecision(
                    h, HeadFate.FOLDED, f"outputs the constant value bias, folded into {site.o_name}.bias"
                )
            )
        elif v_zero:
            decisions.append(HeadDecision(h, HeadFate.KEPT_FOLDING_OFF, "outputs the constant value bias"))
        elif uniform:
            decisions.append(
                HeadDecision(
                    h, HeadFate.KEPT_UNIFORM, "query/key zero: uniform attention still averages the values"
                )
            )
    return _keep_one(site, decisions)


def _keep_one(site: AttentionSite, decisions: list[HeadDecision]) -> list[HeadDecision]:
    """Never remove every head: keep one, preferring one that needs no folding."""
    removed = [d for d in decisions if d.fate.removed]
    if len(removed) < site.num_heads:
        return decisions
    keep = next((d for d in removed if d.fate is HeadFate.REMOVED), removed[0])
    kept = HeadDecision(
        keep.head, HeadFate.KEPT_MIN_ONE, f"the layer needs at least one head ({keep.reason})"
    )
    return [kept if d is keep else d for d in decisions]


@dataclass(frozen=True)
class QueryCut:
    """Grouped-query attention: the query heads (0 .. group-1 within their group) that the output projection
    ignores in each key/value group that stays, and how many go from every such group. The forwards split
    the query heads evenly over the groups (``num_key_value_groups``), so every group must keep as many:
    ``cut`` is the fewest any kept group has, and never the whole group (its key/value head would be unread).
    """

    ignored: dict[int, list[int]]  # kept unit -> its ignored query heads
    cut: int

    def dropped(self, unit: int) -> list[int]:
        return self.ignored.get(unit, [])[: self.cut]


def _query_cut(site: AttentionSite, gone: list[int]) -> QueryCut:
    """Which query heads of the kept key/value groups ``site``'s output projection ignores (zero columns)."""
    kept = [u for u in range(site.num_heads) if u not in gone]
    if site.group < 2 or not kept:
        return QueryCut({}, 0)
    o = site.linear("o")
    shrinker = shrinker_for(o)
    assert shrinker is not None
    columns = torch.arange(site.num_heads * site.group * site.head_dim)
    ignored_at = shrinker.in_cols_zero(o, columns).reshape(site.num_heads, site.group, site.head_dim).all(2)
    ignored = {u: [j for j in range(site.group) if bool(ignored_at[u, j])] for u in kept}
    ignored = {u: heads for u, heads in ignored.items() if heads}
    cut = min(len(ignored.get(u, [])) for u in kept)
    return QueryCut(ignored, min(cut, site.group - 1))


def _query_summary(site: AttentionSite, cut: QueryCut) -> str:
    """One line on the ignored query heads of kept groups: removed, and kept where a group lacked them."""
    every = [u * site.group + j for u, heads in sorted(cut.ignored.items()) for j in heads]
    removed = [u * site.group + j for u in sorted(cut.ignored) for j in cut.dropped(u)]
    kept = [h for h in every if h not in removed]
    parts = []
    if removed:
        parts.append(
            f"query heads {removed} removed ({site.o_name} ignores them; every key/value group keeps "
            f"{site.group - cut.cut} of its {site.group} query heads)"
        )
    if kept:
        parts.append(
            f"query heads {kept} kept ({site.o_name} ignores them, but every key/value group keeps as many "
            f"query heads as the one with the fewest ignored: {cut.cut} go from each)"
        )
    return "; ".join(parts)


def _site_decisions(site: AttentionSite, fold: bool) -> list[HeadDecision]:
    """What each zeroed head of ``site`` would become, its layout's refusal applied."""
    decisions = _decide(site, fold)
    refused = site.layout.refuse(site.module)
    if refused is None:
        return decisions
    return [HeadDecision(d.head, HeadFate.KEPT_LAYOUT, refused) if d.fate.removed else d for d in decisions]


def _tied(sites: list[AttentionSite], decided: list[list[HeadDecision]]) -> list[list[HeadDecision]]:
    """Sites whose layout ties them (:attr:`Layout.tie`: T5's layers of one stack) lose only the heads every
    one of them loses; a head that some keep is kept in all, with the layout's reason and who keeps it."""
    keys = [s.layout.tie(s.name) if s.layout.tie is not None else None for s in sites]
    out = list(decided)
    for key in {k for k in keys if k is not None}:
        members = [i for i, k in enumerate(keys) if k == key]
        gone = {i: {d.head for d in decided[i] if d.fate.removed} for i in members}
        common = set.intersection(*gone.values())
        keepers = {
            h: [sites[i].name for i in members if h not in gone[i]] for h in set().union(*gone.values())
        }
        for i in members:
            why = sites[i].layout.tie_reason
            out[i] = [
                d
                if not d.fate.removed or d.head in common
                else HeadDecision(d.head, HeadFate.KEPT_LAYOUT, _kept_by(why, d.head, keepers[d.head]))
                for d in decided[i]
            ]
    return out


def _kept_by(why: str, head: int, names: list[str]) -> str:
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return f"{why}; {names[0]}{more} keep{'s' if len(names) == 1 else ''} head {head}"


def _compact_site(site: AttentionSite, decisions: list[HeadDecision]) -> HeadChange | None:
    refused = site.layout.refuse(site.module)
    gone = [d.head for d in decisions if d.fate.removed]
    grouped = site.layout.grouped and site.group > 1 and refused is None
    queries = _query_cut(site, gone) if grouped else QueryCut({}, 0)
    if not decisions and not queries.ignored:
        return None
    if gone or queries.cut:
        _apply(site, gone, [d.head for d in decisions if d.fate is HeadFate.FOLDED], queries)
    unit = f"key/value heads, each with its {site.group} query heads: " if site.group > 1 else ""
    reason = "; ".join(
        part
        for part in (unit + _summary(decisions) if decisions else "", _query_summary(site, queries))
        if part
    )
    return HeadChange(
        layer=site.name,
        heads_before=site.num_heads,
        heads_after=site.num_heads - len(gone),
        removed=tuple(gone),
        reason=reason,
        decisions=tuple(decisions),
        query_heads=(site.group, site.group - queries.cut) if grouped else None,
    )


def _apply(site: AttentionSite, gone: list[int], folded: list[int], queries: QueryCut) -> None:
    """Fold the constant heads into the output bias, then rebuild q/k/v (rows; a fused projection once, with
    the kept rows of each part in their order) and o (columns): without the ``gone`` units, and in
    grouped-query attention without the query heads ``queries`` drops; then the head counts."""
    o = site.linear("o")
    o_shrinker = shrinker_for(o)
    assert o_shrinker is not None
    if folded:
        v_bias = getattr(site.linear("v"), "bias", None)
        assert isinstance(v_bias, torch.Tensor)  # a folded head has a non-zero value bias
        idx = torch.tensor([r for h in folded for r in site.rows("o", h)], dtype=torch.long)
        # each query head of a folded unit reads its key/value head's constant value bias
        values = torch.cat([v_bias.detach()[site.rows("v", h)].repeat(site.group) for h in folded])
        writes = o_shrinker.fold_writes
        own_parameters(o, {"": None if writes is None else set(writes)})  # o's tensors may be the model's
        o_shrinker.fold_constant(o, idx, values.double())
    kept = [h for h in range(site.num_heads) if h not in gone]
    rows: dict[str, list[int]] = {}
    for which in ("q", "k", "v"):
        rows.setdefault(site.attr(which), []).extend(
            r for h in kept for r in _kept_rows(site, which, h, queries)
        )
    for attr, keep in rows.items():
        layer = getattr(site.module, attr)
        shrinker = shrinker_for(layer)
        assert shrinker is not None  # a layer compactor shrinks (_layout_matches)
        setattr(site.module, attr, shrinker.shrink(layer, torch.tensor(sorted(keep), dtype=torch.long), None))
    keep_o = torch.tensor([r for h in kept for r in _kept_rows(site, "o", h, queries)], dtype=torch.long)
    setattr(site.o_owner, site.o, o_shrinker.shrink(o, None, keep_o))
    for attr in site.layout.per_head:  # one output column per head: the kept heads' columns, in order
        layer = getattr(site.module, attr, None)
        shrinker = shrinker_for(layer) if isinstance(layer, nn.Module) else None
        if shrinker is not None:
            assert not queries.cut  # per-head layers belong to layouts without key/value groups
            setattr(site.module, attr, shrinker.shrink(layer, torch.tensor(kept, dtype=torch.long), None))
    after = Shape(site.num_heads - len(gone), site.group - queries.cut, site.head_dim)
    for attr, value in site.layout.counts(after).items():
        if isinstance(get_count(site.module, attr), int):
            set_count(site.module, attr, value)


def _kept_rows(site: AttentionSite, which: str, unit: int, queries: QueryCut) -> list[int]:
    """The rows of q/k/v (columns of o) that unit ``unit`` keeps: all but its dropped query heads."""
    rows = site.rows(which, unit)
    if which not in ("q", "o") or not queries.dropped(unit):
        return rows
    dropped = set(queries.dropped(unit))
    hd = site.head_dim
    return [r for j in range(site.group) if j not in dropped for r in rows[j * hd : (j + 1) * hd]]


def _unpaired(name: str, module: nn.Module, why: str) -> HeadChange | None:
    """Report an attention module we could not pair, if it had heads that looked removable."""
    found = _layout_of(module)
    if found is None or isinstance(found[1], str):
        return None  # shapes we do not understand: nothing to claim about heads
    layout, shape = found
    assert isinstance(shape, Shape)
    site = AttentionSite(name, module, layout, module, "", "", shape.head_dim, shape.units, shape.group)
    v = site.linear("v")
    zero = [h for h in range(shape.units) if _rows_zero(v, site.rows("v", h))]
    if not zero:
        return None
    decisions = tuple(HeadDecision(h, HeadFate.KEPT_NO_PAIRING, why) for h in zero)
    return HeadChange(name, shape.units, shape.units, (), _summary(list(decisions)), decisions)


def _summary(decisions: list[HeadDecision]) -> str:
    def parts() -> Iterator[str]:
        for fate in HeadFate:
            heads = [d.head for d in decisions if d.fate is fate]
            if heads:
                why = next(d.reason for d in decisions if d.fate is fate)
                yield f"{fate.value} {heads} ({why})"

    return "; ".join(parts())


def remove_heads(
    model: nn.Module,
    inputs: ExampleInputs,
    runs: list[ExampleInputs],
    references: list[Outputs],
    tolerance: float,
    uncalled: frozenset[str] = frozenset(),
) -> tuple[nn.Module, list[HeadChange]]:
    """The heads stage: :func:`compact_heads` verified against the masked model's outputs (``references`` on
    ``runs``); attention modules no forward called (``uncalled``) are left as they are."""

    def check(candidate: nn.Module) -> str | None:
        verdict = compare(candidate, runs, references, tolerance)
        return None if verdict.ok else verdict.summary()

    new, heads = compact_heads(model, inputs, verify=check, skip=uncalled)
    return new.eval(), heads
