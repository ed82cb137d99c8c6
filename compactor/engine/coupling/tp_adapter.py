"""Stage 3, coupling: channel coupling from Torch-Pruning's ``DependencyGraph``, behind one adapter.

This is the only module that imports ``torch_pruning`` (:mod:`.tp_groups` reads its groups by their
attributes and names its op types): it tells the tracer about
every registered layer type it does not know (a pruner made from the layer's shrinker), and describes what
it found in compactor's own terms (:class:`Member` with a :class:`Kind` and a :class:`Side`). It checks the library's preconditions (grad mode
on, every parameter requiring grad while tracing, train/eval mode restored), turns its groups into our
own frozen :class:`ChannelGroup`, and sanity-checks every index mapping: Torch-Pruning treats unknown
ops as channel-preserving and mis-maps some layouts (a tensor feeding both a ``cat`` and a conv maps
the wrong channels onto the conv, for one). A member whose indices fall outside its layer is dropped
and the group is flagged; the verification stage remains the judge of what ships. The walk from a root
to its coupled channels follows Torch-Pruning's dependencies as a fixpoint (:func:`_pruning_group`); where
the library fails (an index mapping that raises, an op that reads a layer's weight outside it, a mapping
that makes new indices forever) only the roots it touches keep their channels, with the reason.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, cast

import torch
import torch_pruning as tp
from torch import nn

from ...errors import CouplingByRule, CouplingUnmapped, CouplingUnsettled, GraphError, first_line
from ...inputs import ExampleInputs, flatten_outputs
from ...layers import Role, Shrinker, Side, registered_types, shrinker_for, shrinker_of_type
from ...util import check_time, eval_mode_restored
from .groups import ChannelGroup, Kind, Member, norm_after
from .tp_groups import _SUSPECT_OPS, _convert, _is_producer, _kind_of_op, _role, _tp_depthwise


def _tp_groups(
    model: nn.Module, inputs: ExampleInputs, *, train: bool = False, stop_by_rule: bool = False
) -> list[ChannelGroup]:
    """Torch-Pruning's groups (raises :class:`GraphError` where it cannot trace the model).

    ``stop_by_rule``: raise :class:`CouplingByRule` as soon as a walk reaches an op whose member would make
    the groups suspect (:func:`_suspect`), rather than finish walks whose answer would be set aside: through
    the window partitions of a MaxViT, Torch-Pruning's reshape mappings multiply the index lists into the
    millions (issue #11: 101 s)."""

    called: set[int] = set()

    def forward(m: nn.Module, x: ExampleInputs) -> Any:
        hook = nn.modules.module.register_module_forward_hook(lambda layer, a, o: called.add(id(layer)))
        try:
            return m.train(train)(*x.args, **x.kwargs)
        finally:
            hook.remove()

    names = {p: n for n, p in model.named_parameters()}
    outputs: list[torch.Tensor] = []

    def output_transform(out: Any) -> list[torch.Tensor]:
        outputs[:] = [t for _, t in flatten_outputs(out)]
        return outputs

    with _tracing_state(model):
        graph = tp.DependencyGraph()
        try:
            graph.build_dependency(
                model,
                example_inputs=inputs,
                forward_fn=forward,
                output_transform=output_transform,
                verbose=False,
                customized_pruners=_custom_pruners(),
            )
            unmapped: dict[Any, str] = {}
        except Exception as e:  # the library raises anything from AssertionError to KeyError
            if not _failed_mapping(e, graph):
                raise GraphError(
                    f"torch-pruning could not trace the model ({type(e).__name__}: {first_line(e)})"
                ) from e
            unmapped = _map_indices(graph)
        unmapped = {**_functional_weights(graph, model), **unmapped}
        if stop_by_rule:
            _check_reached(graph, model, called)
        writers = _output_writers(graph, outputs)
        groups = _collect_groups(graph, model, names, unmapped, writers, stop_by_rule=stop_by_rule)
    return groups


def _check_reached(graph: Any, model: nn.Module, called: set[int]) -> None:
    """Torch-Pruning walks back from the outputs' ``grad_fn``: a layer that the forward calls but whose
    output reaches the outputs only through integer tensors (scores picked by ``topk`` indices, an
    ``argmax`` that gathers) has no node, and its channels no group. Raise :class:`CouplingByRule` there, so
    that compactor's labels, which follow every tensor the forward makes, answer for the model."""
    for name, layer in model.named_modules():
        if id(layer) in called and _is_producer(layer) and layer not in graph.module2node:
            raise CouplingByRule(
                f"torch-pruning's graph does not reach {name}: its output reaches the outputs only through "
                f"integer tensors (indices)"
            )


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


def _failed_mapping(e: Exception, graph: Any) -> bool:
    """Whether ``build_dependency`` failed only in its last pass, the index mappings of concatenations,
    splits, reshapes... (a ``ZeroDivisionError`` on ShuffleNetV2's channel shuffle, ``int + None`` where it
    cannot size a concatenation's input): the graph itself is built, and the mappings are redone one node
    at a time (:func:`_map_indices`)."""
    tb = e.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return "update_index_mapping" in frames and bool(getattr(graph, "module2node", None))


def _functional_weights(graph: Any, model: nn.Module) -> dict[Any, str]:
    """Ops that read the weight of a layer the forward never calls (torchvision's Swin runs
    ``F.linear(x, self.qkv.weight, ...)``): Torch-Pruning drops the weight from its graph and takes the op
    for channel-preserving, so it couples the channels on both sides of a projection. No walk goes through
    them; the channels that reach them stay."""
    owners = {
        p: name
        for name, m in model.named_modules()
        if m not in graph.module2node and shrinker_for(m) is not None
        for p in m.parameters(recurse=False)
    }
    found = {}
    for node in graph.module2node.values():
        if node.module in graph._module2name:
            continue  # a layer (its own weights) or a bare parameter, not a traced op
        for fn, _ in getattr(node.grad_fn, "next_functions", ()) or ():
            weight = getattr(fn, "variable", None)
            if weight is not None and weight in owners:
                found[node] = f"it reads the weight of {owners[weight]}, a layer the forward never calls"
                break
    return found


def _map_indices(graph: Any) -> dict[Any, str]:
    """Torch-Pruning's index-mapping pass (``index_mapping.update_index_mapping``), one node at a time:
    returns the nodes it fails on, each with the error. No walk goes through such a node (its mapping is
    unknown): the roots whose coupling reaches it keep their channels, with the error as reason."""
    from torch_pruning.dependency import index_mapping as im

    update = {
        tp.ops.OPTYPE.CONCAT: im.update_concat_index_mapping,
        tp.ops.OPTYPE.SPLIT: im.update_split_index_mapping,
        tp.ops.OPTYPE.RESHAPE: im.update_reshape_index_mapping,
        tp.ops.OPTYPE.UNBIND: im.update_unbind_index_mapping,
        tp.ops.OPTYPE.EXPAND: im.update_expand_index_mapping,
        tp.ops.OPTYPE.SLICE: im.update_slice_index_mapping,
    }
    failed = {}
    for node in list(graph.module2node.values()):
        if node.type not in update:
            continue
        try:
            update[node.type](graph, node)
        except Exception as e:  # ZeroDivisionError, TypeError (int + None), RecursionError...
            failed[node] = f"its index mapping fails: {type(e).__name__}: {first_line(e)}"
    return failed


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
    graph: Any,
    model: nn.Module,
    param_names: dict[Any, str],
    unmapped: Mapping[Any, str],
    output_writers: set[nn.Module],
    *,
    stop_by_rule: bool = False,
) -> list[ChannelGroup]:
    module_names = {m: n for n, m in model.named_modules()}
    writes_output = {module_names[m] for m in output_writers if m in module_names}
    covered: set[tuple[str, Side, int]] = set()  # (layer, side, index) already in a group
    norms = norm_after(model, _single_outputs(graph, module_names))
    groups: list[ChannelGroup] = []
    for module in list(graph.module2node.keys()):
        if not isinstance(module, nn.Module) or not _is_producer(module):
            continue
        name = module_names[module]
        pruner = graph.get_pruner_of_module(module)
        n = pruner.get_out_channels(module)
        if n is None or all((name, Side.OUT, i) in covered for i in range(n)):
            continue
        check_time(f"the channel coupling from {name}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tp_group = _pruning_group(
                    graph, module, pruner.prune_out_channels, n, unmapped=unmapped, stop_by_rule=stop_by_rule
                )
        except CouplingByRule:
            raise
        except Exception as e:  # the library's mappings can raise anything: that root's channels stay
            why = (
                str(e)
                if isinstance(e, GraphError)
                else (
                    f"torch-pruning failed while coupling the channels of {name} ({type(e).__name__}: "
                    f"{first_line(e)}): kept"
                )
            )
            covered.update((name, Side.OUT, i) for i in range(n))
            root = Member(name, type(module).__name__, Side.OUT, Kind.LAYER, 0, tuple((i,) for i in range(n)))
            groups.append(ChannelGroup(name, n, (root,), False, (why,)))
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


def _pruning_group(
    graph: Any,
    module: nn.Module,
    prune_out: Any,
    n: int,
    *,
    unmapped: Mapping[Any, str] = {},  # read only
    stop_by_rule: bool = False,
) -> Any:
    """``graph.get_pruning_group(module, prune_out, range(n))``: the same coupled channels, found as a
    fixpoint.

    Torch-Pruning walks every path from the root with the index list it carries, and stops a path only
    when the same (layer, index list) was seen before. Where paths split and join (a split into branches
    and a concatenation back, a residual add beside them: Inception-NeXt, Res2Net, ReXNet, MambaOut), a
    node is reached with every union of the branches' index lists, and each one walks on: the number of
    lists doubles with every block and the walk never ends. The mappings are per index, so the coupled
    channels are the least fixpoint of the pairs (layer-local index, root index) each (node, pruning
    function) receives: here each pair walks on once, when it is new. Indices are finite, so this
    terminates, unless a mapping makes new indices forever (a rotary embedding's half-split, negate and
    concatenate, mis-mapped by the library, shifts them on every lap, VainF/Torch-Pruning#527): an index
    past the end of the largest tensor of the model raises :class:`~compactor.errors.CouplingUnsettled`,
    and a node whose index mapping the library could not compute (``unmapped``, from :func:`_map_indices`)
    raises :class:`~compactor.errors.CouplingUnmapped`; either way that root keeps its channels."""
    from torch_pruning import _helpers
    from torch_pruning.dependency.dependency import Dependency
    from torch_pruning.dependency.group import Group

    if _tp_depthwise(module):
        prune_out = tp.pruner.function.prune_depthwise_conv_out_channels  # as Torch-Pruning does
    root = graph.module2node[module]
    limits = _index_limits(graph)
    reached: dict[tuple[Any, Any], tuple[Any, set[tuple[int, int]]]] = {}  # (node, fn): first dep, pairs
    start = Dependency(prune_out, prune_out, source=root, target=root)
    queue = deque([(start, [_helpers._HybridIndex(i, i) for i in range(n)])])
    while queue:  # breadth first: a node no walk may enter is met before a mis-mapped cycle grows
        dep, idxs = queue.popleft()
        pairs = reached.setdefault((dep.target, dep.handler), (dep, set()))[1]
        new = [i for i in dict.fromkeys(idxs) if (i.idx, i.root_idx) not in pairs]
        if not new:
            continue
        pairs.update((i.idx, i.root_idx) for i in new)
        for nxt in dep.target.dependencies:
            if not nxt.is_triggered_by(dep.handler):
                continue
            if nxt.target in unmapped:  # before walking on: the walk beyond may not settle
                raise CouplingUnmapped(
                    f"torch-pruning cannot map channels through {nxt.target.name} ({unmapped[nxt.target]}), "
                    f"which the channels of {graph._module2name.get(module, module)} reach: kept"
                )
            if stop_by_rule and _by_rule(nxt.target, graph):
                raise CouplingByRule(
                    f"torch-pruning maps the channels of {graph._module2name.get(module, module)} through "
                    f"{nxt.target.name} by rule"
                )
            mapped = new
            for mapping in nxt.index_mapping:
                if mapping is not None:
                    mapped = mapping(mapped)
            if mapped and max(i.idx for i in mapped) >= limits.get(nxt.target, 0):
                raise CouplingUnsettled(
                    f"torch-pruning's channel coupling from {graph._module2name.get(module, module)} does not "
                    f"settle (it maps channel {max(i.idx for i in mapped)} into {nxt.target.name}, past its "
                    "tensor and every layer's width): kept"
                )
            if mapped:
                queue.append((nxt, mapped))
    group = Group()
    for dep, pairs in reached.values():
        ordered = sorted(pairs)
        item = _helpers.GroupItem(dep, [local for local, _ in ordered])
        item.root_idxs = [r for _, r in ordered]
        group.add_dep(dep, [])
        group[len(group) - 1] = item
    group._DG = graph
    return group


def _by_rule(node: Any, graph: Any) -> bool:
    """Whether :func:`_convert` would make ``node`` a member that :func:`_suspect` sets aside: a traced op
    (not a layer of the model or a parameter) that cuts channels at fixed sizes or moves them by rule."""
    target = node.module
    if isinstance(target, nn.Parameter) or target in graph._module2name:
        return False
    op = type(target).__name__
    return _kind_of_op(target, node.name).fixed_sizes or any(w in node.name or w in op for w in _SUSPECT_OPS)


def _index_limits(graph: Any) -> dict[Any, int]:
    """Per node, one past the largest index a mapping can rightly bring there: the element count of the
    node's tensor (Torch-Pruning's indices count flattened features at most), or the widest layer of the
    model where that is more (the library passes a layer's channels through broadcasting ops whose tensors
    are smaller: an RMSNorm's mean). Cached on the graph."""
    cached = getattr(graph, "_compactor_index_limits", None)
    if cached is not None:
        return cast(dict[Any, int], cached)
    widest = 1
    for module in graph.module2node:
        if isinstance(module, torch.Tensor):
            widest = max(widest, *module.shape, 1)
        elif module in graph._module2name and (pruner := graph.get_pruner_of_module(module)) is not None:
            widths = (pruner.get_out_channels(module), pruner.get_in_channels(module))
            widest = max(widest, *(w for w in widths if isinstance(w, int)))
    limits = {}
    for module, node in graph.module2node.items():
        sizes = [math.prod(m.shape) for m in getattr(node.grad_fn, "_input_metadata", ()) or ()]
        if isinstance(module, torch.Tensor):
            sizes.append(module.numel())
        limits[node] = max(widest, *sizes)
    graph._compactor_index_limits = limits
    return limits


def _single_outputs(graph: Any, module_names: dict[nn.Module, str]) -> Iterator[tuple[str, str]]:
    """(layer, the layer its node's one output node is) for each layer of the graph with one output node:
    the edges :func:`~.groups.norm_after` looks at."""
    for module, node in graph.module2node.items():
        if not isinstance(module, nn.Module) or module not in module_names or len(node.outputs) != 1:
            continue
        after = node.outputs[0].module
        if after in module_names:
            yield module_names[module], module_names[after]
