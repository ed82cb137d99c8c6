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

Two layouts are recognised (:data:`LAYOUTS`), both read through attributes that their ``forward`` uses:

* BERT family (``BertSelfAttention``, RoBERTa, ELECTRA, ...): ``query``/``key``/``value`` Linear and
  ``num_attention_heads``/``attention_head_size``/``all_head_size`` on the attention module, and the output
  projection ``output.dense`` on its parent (``BertAttention``: ``self.output(self.self(...)[0], ...)``).
* ViT/CLIP family: ``q_proj``/``k_proj``/``v_proj`` and ``o_proj`` or ``out_proj`` on one module, with
  ``head_dim`` and ``num_attention_heads`` or ``num_heads``.
* Decoders with grouped-query attention (Llama, Mistral, Qwen2/3, Gemma 2/3): ``q_proj``/``k_proj``/
  ``v_proj``/``o_proj`` with ``head_dim`` and ``num_key_value_groups`` (query heads per key/value head).
  The unit is a whole KV group: a key/value head with its query heads, removed where its value rows are zero
  (every query head of the group outputs zero, or the constant value bias, folded) or ``o_proj`` ignores
  all of its query heads. ``num_key_value_groups`` stays; the forwards reshape with ``-1`` heads.

Transformers 5 reshapes with ``-1`` heads and never reads ``config.num_attention_heads`` in these forwards, so
the shared config is left unchanged (it describes the dense model; transformers 5 has no ``pruned_heads``).
Consequences for callers: ``output_attentions=True`` returns maps for the remaining heads only; a
``StaticCache`` (decoders), which preallocates from the config, does not fit; and the result reloads with
``torch.load`` of the whole module, not ``from_pretrained``. Verification stays the judge:
run the model's outputs against the masked model after :func:`compact_heads`, as ``compact`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from ..inputs import ExampleInputs, run
from ..layers import Side, shrinker_for
from ..modules import baked, own_parameters
from ..outputs import Outputs, compare
from ..util import eval_mode_restored


class HeadFate(str, Enum):
    REMOVED = "removed"  # outputs exactly zero, or the output projection ignores it
    FOLDED = "folded"  # outputs a constant, folded into the output projection's bias
    KEPT_UNIFORM = "kept: attends uniformly"  # query/key zero, values not: still averages the input
    KEPT_MIN_ONE = "kept: layer needs a head"
    KEPT_NO_PAIRING = "kept: no output projection found"
    KEPT_FOLDING_OFF = "kept: fold_constant_heads=False"
    KEPT_UNVERIFIED = "kept: verification failed"

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


@dataclass(frozen=True)
class Layout:
    """Attribute names of one family of attention modules."""

    name: str
    q: str
    k: str
    v: str
    heads_attrs: tuple[str, ...]  # the first present is the head count
    dim_attr: str  # the per-head size
    o_attrs: tuple[str, ...]  # output projection on the module itself; empty: ``output.dense`` on the parent
    size_attrs: tuple[str, ...] = ()  # other attributes equal to heads * head_dim, kept in step
    grouped: bool = False  # heads_attrs names the query heads per key/value head; the unit is a KV group


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="bert",
        q="query",
        k="key",
        v="value",
        heads_attrs=("num_attention_heads",),
        dim_attr="attention_head_size",
        o_attrs=(),
        size_attrs=("all_head_size",),
    ),
    Layout(
        name="proj",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        heads_attrs=("num_attention_heads", "num_heads"),
        dim_attr="head_dim",
        o_attrs=("o_proj", "out_proj"),
    ),
    Layout(
        name="decoder",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        heads_attrs=("num_key_value_groups",),
        dim_attr="head_dim",
        o_attrs=("o_proj",),
        grouped=True,
    ),
)


@dataclass(frozen=True)
class AttentionSite:
    """One attention module and the Linear layers that hold its heads."""

    name: str
    module: nn.Module
    layout: Layout
    o_owner: nn.Module  # the module holding the output projection as attribute ``o``
    o: str
    o_name: str  # the output projection's full name, for reports
    heads_attr: str
    head_dim: int
    num_heads: int  # units: heads, or for grouped-query attention key/value heads
    group: int = 1  # query heads per unit (grouped-query attention: num_key_value_groups)

    def rows(self, which: str, unit: int) -> list[int]:
        """The rows of q/k/v (columns of o) that unit ``unit`` holds: a KV group's query heads for q and o."""
        width = self.head_dim * (self.group if which in ("q", "o") else 1)
        return list(range(unit * width, (unit + 1) * width))

    def attr(self, which: str) -> str:
        """The attribute name of projection ``which`` ('q', 'k', 'v' on the module, 'o' on ``o_owner``)."""
        name: str = self.o if which == "o" else getattr(self.layout, which)
        return name

    def linear(self, which: str) -> nn.Linear:
        owner = self.o_owner if which == "o" else self.module
        layer: nn.Linear = getattr(owner, self.attr(which))
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
    changes = [change for site in sites if (change := _compact_site(site, fold)) is not None]
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


# --- finding attention modules ---------------------------------------------------------------------
def _find_sites(model: nn.Module) -> tuple[list[AttentionSite], list[tuple[str, nn.Module, str]]]:
    """Every recognised attention module, paired with its output projection; and those left unpaired."""
    sites: list[AttentionSite] = []
    unpaired: list[tuple[str, nn.Module, str]] = []
    parents = {
        id(child): (name, parent) for name, parent in model.named_modules() for child in parent.children()
    }
    for name, module in model.named_modules():
        layout = _layout_of(module)
        if layout is None:
            continue
        shape = _head_shape(module, layout)
        if isinstance(shape, str):
            unpaired.append((name, module, shape))
            continue
        heads_attr, num_heads, head_dim = shape
        group = getattr(module, heads_attr) if layout.grouped else 1
        owner, o_attr, o_name = _output_projection(name, module, layout, parents)
        if owner is None:
            unpaired.append((name, module, o_name))
            continue
        o = getattr(owner, o_attr)
        if o.in_features != num_heads * group * head_dim:
            unpaired.append(
                (name, module, f"{o_name} reads {o.in_features} features, not {num_heads * group * head_dim}")
            )
            continue
        sites.append(
            AttentionSite(name, module, layout, owner, o_attr, o_name, heads_attr, head_dim, num_heads, group)
        )
    return sites, unpaired


def _layout_of(module: nn.Module) -> Layout | None:
    for layout in LAYOUTS:
        if not all(isinstance(getattr(module, a, None), nn.Linear) for a in (layout.q, layout.k, layout.v)):
            continue
        if not isinstance(getattr(module, layout.dim_attr, None), int):
            continue
        if not any(isinstance(getattr(module, a, None), int) for a in layout.heads_attrs):
            continue
        if layout.o_attrs and not any(
            isinstance(getattr(module, a, None), nn.Linear) for a in layout.o_attrs
        ):
            continue
        return layout
    return None


def _head_shape(module: nn.Module, layout: Layout) -> tuple[str, int, int] | str:
    """(head-count attribute, heads, head size), or why the module's shapes do not split into heads."""
    heads_attr = next(a for a in layout.heads_attrs if isinstance(getattr(module, a, None), int))
    if layout.grouped:
        return _grouped_shape(module, layout, heads_attr)
    num_heads, head_dim = getattr(module, heads_attr), getattr(module, layout.dim_attr)
    widths = {a: getattr(module, a).out_features for a in (layout.q, layout.k, layout.v)}
    if len(set(widths.values())) != 1:
        return f"query/key/value widths differ ({widths}): grouped-query attention is not compacted"
    if num_heads * head_dim != widths[layout.q]:
        return f"{heads_attr}={num_heads} x {layout.dim_attr}={head_dim} != {widths[layout.q]} query features"
    if getattr(module, "num_key_value_groups", 1) != 1:
        return "grouped-query attention (num_key_value_groups > 1) is not compacted"
    return heads_attr, num_heads, head_dim


def _grouped_shape(module: nn.Module, layout: Layout, groups_attr: str) -> tuple[str, int, int] | str:
    """Grouped-query attention (Llama, Mistral, Qwen, Gemma): key/value heads from the key width, each
    read by ``num_key_value_groups`` query heads."""
    group, head_dim = getattr(module, groups_attr), getattr(module, layout.dim_attr)
    q, k, v = (getattr(module, a).out_features for a in (layout.q, layout.k, layout.v))
    if group < 1 or head_dim < 1 or k != v or k % head_dim or q != k * group:
        return f"query/key/value widths {q}/{k}/{v} do not split into {groups_attr}={group} groups of {layout.dim_attr}={head_dim}"
    return groups_attr, k // head_dim, head_dim


def _output_projection(
    name: str, module: nn.Module, layout: Layout, parents: dict[int, tuple[str, nn.Module]]
) -> tuple[nn.Module | None, str, str]:
    """(owner, attribute, full name) of the output projection, or (None, "", why not found)."""
    for attr in layout.o_attrs:
        if isinstance(getattr(module, attr, None), nn.Linear):
            return module, attr, f"{name}.{attr}"
    if layout.o_attrs:
        return None, "", f"{name} has none of {layout.o_attrs}"
    if id(module) not in parents:
        return None, "", f"{name} has no parent module holding output.dense"
    parent_name, parent = parents[id(module)]
    output = getattr(parent, "output", None)
    if output is None or output is module or not isinstance(getattr(output, "dense", None), nn.Linear):
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
def _decide(site: AttentionSite, fold: bool) -> list[HeadDecision]:
    q, k, v, o = (site.linear(w) for w in ("q", "k", "v", "o"))
    decisions = []
    for h in range(site.num_heads):
        rows, q_rows = site.rows("v", h), site.rows("q", h)
        v_zero = bool((v.weight[rows] == 0).all())
        v_bias = v.bias[rows] if v.bias is not None else None
        v_bias_zero = v_bias is None or bool((v_bias == 0).all())
        q_zero = bool((q.weight[q_rows] == 0).all()) and (q.bias is None or bool((q.bias[q_rows] == 0).all()))
        uniform = bool((k.weight[rows] == 0).all()) or q_zero  # every key gets the same score
        if bool((o.weight[:, q_rows] == 0).all()):
            decisions.append(HeadDecision(h, HeadFate.REMOVED, f"{site.o_name} ignores it (zero columns)"))
        elif v_zero and v_bias_zero:
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
    o = site.linear("o").weight.detach()
    ignored_at = (o.reshape(o.shape[0], site.num_heads, site.group, site.head_dim) == 0).all(3).all(0)
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


def _compact_site(site: AttentionSite, fold: bool) -> HeadChange | None:
    decisions = _decide(site, fold)
    gone = [d.head for d in decisions if d.fate.removed]
    queries = _query_cut(site, gone) if site.layout.grouped else QueryCut({}, 0)
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
        query_heads=(site.group, site.group - queries.cut)
        if site.layout.grouped and site.group > 1
        else None,
    )


def _apply(site: AttentionSite, gone: list[int], folded: list[int], queries: QueryCut) -> None:
    """Fold the constant heads into the output bias, then rebuild q/k/v (rows) and o (columns): without the
    ``gone`` units, and in grouped-query attention without the query heads ``queries`` drops."""
    o = site.linear("o")
    o_shrinker = shrinker_for(o)
    assert o_shrinker is not None
    if folded:
        v_bias = site.linear("v").bias
        assert v_bias is not None  # a folded head has a non-zero value bias
        idx = torch.tensor([r for h in folded for r in site.rows("o", h)], dtype=torch.long)
        # each query head of a folded unit reads its key/value head's constant value bias
        values = torch.cat([v_bias.detach()[site.rows("v", h)].repeat(site.group) for h in folded])
        writes = o_shrinker.fold_writes
        own_parameters(o, {"": None if writes is None else set(writes)})  # o's tensors may be the model's
        o_shrinker.fold_constant(o, idx, values.double())
    kept = [h for h in range(site.num_heads) if h not in gone]
    for which in ("q", "k", "v"):
        layer = site.linear(which)
        shrinker = shrinker_for(layer)
        assert shrinker is not None  # a Linear, or a subclass of it
        keep = torch.tensor([r for h in kept for r in _kept_rows(site, which, h, queries)], dtype=torch.long)
        setattr(site.module, site.attr(which), shrinker.shrink(layer, keep, None))
    keep_o = torch.tensor([r for h in kept for r in _kept_rows(site, "o", h, queries)], dtype=torch.long)
    setattr(site.o_owner, site.o, o_shrinker.shrink(o, None, keep_o))
    if site.layout.grouped:
        # the forwards reshape with -1 heads and repeat each key/value head num_key_value_groups times
        setattr(site.module, site.heads_attr, site.group - queries.cut)
        return
    heads = site.num_heads - len(gone)
    setattr(site.module, site.heads_attr, heads)
    for attr in site.layout.size_attrs:
        if isinstance(getattr(site.module, attr, None), int):
            setattr(site.module, attr, heads * site.head_dim)


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
    layout = _layout_of(module)
    shape = _head_shape(module, layout) if layout else why
    if layout is None or isinstance(shape, str):
        return None  # shapes we do not understand: nothing to claim about heads
    _, num_heads, head_dim = shape
    v = getattr(module, layout.v)
    zero = [h for h in range(num_heads) if bool((v.weight[h * head_dim : (h + 1) * head_dim] == 0).all())]
    if not zero:
        return None
    decisions = tuple(HeadDecision(h, HeadFate.KEPT_NO_PAIRING, why) for h in zero)
    return HeadChange(name, num_heads, num_heads, (), _summary(list(decisions)), decisions)


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
