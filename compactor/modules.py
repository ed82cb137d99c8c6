"""Modules as compactor copies and bakes them: clones that survive masked and caching modules, and masks
and re-parametrisations baked into plain weights.

Baking a ``torch.nn.utils.prune`` mask leaves ``weight = weight_orig * weight_mask`` as an ordinary
parameter, with no ``*_orig``, ``*_mask`` or pruning hook left: the function computed is unchanged (the hook
computed the same product on every forward). The pipeline's stages, the writers and the measurements share
these helpers; :mod:`compactor.engine.masks` holds the masks stage itself (the masked model as the user has it).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import SharedWriteError


@dataclass(frozen=True)
class BakedMask:
    """One mask that was baked: which layer and tensor, and how many entries it zeroed."""

    layer: str
    tensor: str
    zeros: int
    total: int


def bake_masks(model: nn.Module) -> list[BakedMask]:
    """Bake every prune hook and parametrization of ``model`` in place; return what was baked."""
    baked: list[BakedMask] = []
    owners = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    for name, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                tensor_name = hook._tensor_name
                mask = getattr(module, tensor_name + "_mask")
                baked.append(BakedMask(name, tensor_name, _zeros(mask), mask.numel()))
                _remove_untied(
                    module, tensor_name, tied=owners[id(module._parameters[tensor_name + "_orig"])] > 1
                )
        for tensor_name in fold_norm_hooks(module):
            value = getattr(module, tensor_name)
            baked.append(BakedMask(name, tensor_name, _zeros(value), value.numel()))
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
                value = getattr(module, tensor_name)
                baked.append(BakedMask(name, tensor_name, _zeros(value), value.numel()))
            _drop_compat_hooks(module)
    return baked


def _zeros(t: torch.Tensor) -> int:
    return t.numel() - int(torch.count_nonzero(t))


def norm_hooks(module: nn.Module) -> list[str]:
    """The old-style re-parametrisations of ``module`` (forward pre-hooks ``torch.nn.utils.weight_norm`` and
    ``spectral_norm`` attach), as ``"weight_norm(weight)"``."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return [
        f"{'weight_norm' if isinstance(h, WeightNorm) else 'spectral_norm'}({h.name})"
        for h in module._forward_pre_hooks.values()
        if isinstance(h, (WeightNorm, SpectralNorm))
    ]


def reparametrized(model: nn.Module) -> list[str]:
    """Every weight re-parametrisation that baking folds into a plain weight: ``"conv1: weight_norm(weight)"``
    (old-style hooks) and ``"conv1: parametrizations(weight: _WeightNorm)"``; prune masks are not listed."""
    found = []
    for name, module in model.named_modules():
        label = name or "(the model itself)"
        found += [f"{label}: {hook}" for hook in norm_hooks(module)]
        if parametrize.is_parametrized(module):
            for tensor_name, chain in module.parametrizations.items():
                kinds = ", ".join(type(p).__name__ for p in chain)
                found.append(f"{label}: parametrizations({tensor_name}: {kinds})")
    return found


def fold_norm_hooks(module: nn.Module) -> list[str]:
    """Replace ``weight_norm``/``spectral_norm`` hooks by the plain weight they compute in eval mode (torch's
    own ``remove_weight_norm``/``remove_spectral_norm``: ``g * v / ||v||``; ``W / sigma`` from the stored
    ``u``, ``v``, without a power iteration); return the names of the weights folded. Verification then
    proves the folded model equal to the one with its hooks."""
    from torch.nn.utils.spectral_norm import SpectralNorm, remove_spectral_norm
    from torch.nn.utils.weight_norm import WeightNorm, remove_weight_norm

    folded = []
    for hook in list(module._forward_pre_hooks.values()):
        if isinstance(hook, WeightNorm):
            remove_weight_norm(module, hook.name)
            folded.append(hook.name)
        elif isinstance(hook, SpectralNorm):
            remove_spectral_norm(module, hook.name)
            folded.append(hook.name)
    return folded


def _drop_compat_hooks(module: nn.Module) -> None:
    """The state-dict hook ``parametrizations.weight_norm`` leaves behind (a local function: it makes the
    module unpicklable, and it reads ``weight_g``/``weight_v`` keys a baked module no longer has)."""
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        if (
            getattr(getattr(hook, "hook", None), "__qualname__", "")
            == "weight_norm.<locals>._weight_norm_compat_hook"
        ):
            del module._load_state_dict_pre_hooks[key]


def _remove_untied(module: nn.Module, tensor_name: str, *, tied: bool) -> None:
    """``prune.remove``, except that a weight tied to another layer (BERT's decoder and word embeddings)
    stays as it was for that layer: ``prune.remove`` writes ``orig * mask`` into the shared parameter,
    which would mask the other layer too. The pruned layer gets its own, untied parameter."""
    orig = module._parameters[tensor_name + "_orig"]
    assert orig is not None
    kept = orig.data.clone() if tied else None
    prune.remove(module, tensor_name)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    if kept is not None:
        masked = orig.data.clone()
        orig.data = kept
        module._parameters[tensor_name] = nn.Parameter(masked, requires_grad=orig.requires_grad)


def has_pruning_state(model: nn.Module) -> bool:
    """True while any prune hook, ``*_orig`` parameter or parametrization is attached."""
    for module in model.modules():
        if any(isinstance(h, prune.BasePruningMethod) for h in module._forward_pre_hooks.values()):
            return True
        if parametrize.is_parametrized(module) or norm_hooks(module):
            return True
        if any(n.endswith("_orig") for n, _ in module.named_parameters(recurse=False)):
            return True
    return False


def clone_module(model: nn.Module, *, share_parameters: bool = False) -> nn.Module:
    """``copy.deepcopy`` that also works on masked modules and on modules that cache computed tensors.

    ``torch.nn.utils.prune`` keeps ``weight`` as a plain attribute computed from ``weight_orig * weight_mask``;
    it is not a graph leaf, which ``deepcopy`` refuses. The forward pre-hook recomputes it on every call, so a
    detached copy of it is exact. So is one of a cache filled in eval mode (LeViT's, EfficientViT's and
    TinyViT's ``attention_bias_cache``: a dict of ``attention_biases[:, idxs]``, cleared in train mode): it
    holds the value the forward would compute again.

    ``share_parameters=True``: the clone holds ``model``'s own parameter tensors (buffers and the rest are
    copied), at the cost of its buffers only: the rebuild stage's copies, which give the parameters they
    write copies of their own first. Nothing may write into a shared parameter in place.
    """
    memo: dict[int, object] = {}
    if share_parameters:
        for p in model.parameters():
            memo[id(p)] = p
    return clone_module_with(model, memo)


def wide_clone(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A clone of ``model`` with every floating-point parameter and buffer in ``dtype`` (what
    ``clone_module(model).to(dtype)`` gives, without first copying the tensors in their own dtype)."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(_as(p.detach(), dtype), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = _as(b, dtype)
    return clone_module_with(model, memo)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype, copy=True) if t.is_floating_point() else t.clone()


def clone_module_with(model: nn.Module, memo: dict[int, object]) -> nn.Module:
    """:func:`clone_module` with ``memo`` saying what some objects become in the clone."""
    for module in model.modules():
        _memo_non_leaves(module.__dict__, memo)
    clone = copy.deepcopy(model, memo)
    for module in clone.modules():
        if parametrize.is_parametrized(module):
            _own_class(module)
    return clone


def _memo_non_leaves(value: object, memo: dict[int, object]) -> None:
    """Put a detached copy of every non-leaf tensor in ``value`` (a module's ``__dict__``) into
    ``deepcopy``'s ``memo``."""
    for t in _tensors_in(value):
        if not t.is_leaf and id(t) not in memo:
            memo[id(t)] = t.detach().clone()


def _tensors_in(value: object, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor in ``value`` (a module's ``__dict__``: attributes, parameters, buffers, and the dicts,
    lists and tuples they hold), as often as it is held."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (dict, list, tuple, set, frozenset)) and depth < _CONTAINER_DEPTH:
        for item in value.values() if isinstance(value, dict) else value:
            yield from _tensors_in(item, depth + 1)


_CONTAINER_DEPTH = 4  # containers inside containers: deep enough for any cache seen (a dict of tensors)


# --- sharing the user's tensors, never writing them ------------------------------------------------------
def plain_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a clone of ``model`` may share with it while baking: those of layers with no forward
    pre-hook (prune masks, old-style weight/spectral norm) and no parametrization, held by no other layer.
    Baking replaces the others' data (``prune.remove`` sets ``*_orig.data``, removing a parametrization
    ``set_``s its original), so they are never shared."""
    held: dict[int, nn.Parameter] = {}
    unsafe: set[int] = set()
    for module in model.modules():
        hooked = bool(module._forward_pre_hooks) or parametrize.is_parametrized(module)
        for p in module.parameters(recurse=hooked):  # a parametrization's original lives in a child
            if hooked:
                unsafe.add(id(p))
            else:
                held.setdefault(id(p), p)
    return [p for key, p in held.items() if key not in unsafe]


class _WriteGuard(TorchDispatchMode):  # type: ignore[no-untyped-call]  # untyped torch base
    """Refuses, before it happens, any in-place write (an op whose schema marks an argument written: ``add_``,
    ``copy_``, ``out=``) into the storages it guards."""

    def __init__(self, storages: set[int], what: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.storages, self.what = storages, what

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        for i, argument in enumerate(func._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = args[i] if i < len(args) else kwargs.get(argument.name)
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(t, torch.Tensor) and _storage(t) in self.storages:
                    raise SharedWriteError(
                        f"{self.what} writes in place into one of the model's parameters ({func.overloadpacket.__name__} on a "
                        f"{tuple(t.shape)} tensor); nothing was written: make the forward leave its parameters "
                        f"alone (data-dependent initialisation done once, before pruning)"
                    )
        return func(*args, **kwargs)


def _storage(t: torch.Tensor) -> int | None:
    try:
        return int(t.untyped_storage().data_ptr()) or None
    except (RuntimeError, NotImplementedError):  # sparse, meta or wrapper tensors: no plain storage
        return None


@contextmanager
def write_guard(tensors: Iterable[torch.Tensor], what: str) -> Iterator[None]:
    """While inside, an in-place write into any of ``tensors`` raises :class:`SharedWriteError` instead of
    happening: forwards run on clones that share the user's parameters (no copy of the model)."""
    storages = {s for t in tensors if (s := _storage(t)) is not None}
    if not storages:
        yield
        return
    with _WriteGuard(storages, what):
        yield


def own_parameters(root: nn.Module, written: dict[str, set[str] | None]) -> None:
    """Give the parameters ``written`` names (layer -> parameter names, None: all of the layer's) copies of
    their own in ``root`` (ties between them kept)."""
    copies: dict[int, nn.Parameter] = {}
    for name, names in written.items():
        try:
            module = root.get_submodule(name)
        except AttributeError:
            continue
        for key, p in module.named_parameters():
            if names is None or key in names:
                copies.setdefault(id(p), nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    if not copies:
        return
    for module in root.modules():
        for key, held in list(module._parameters.items()):
            if held is not None and id(held) in copies:
                module._parameters[key] = copies[id(held)]


def owned_copy(model: nn.Module, source: nn.Module) -> nn.Module:
    """``model`` with every parameter and buffer it shares with ``source`` replaced by a copy (ties kept):
    what compaction returns owes the user's model nothing, so training it leaves theirs alone."""
    storages = {s for t in [*source.parameters(), *source.buffers()] if (s := _storage(t)) is not None}
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in list(table.items()):
                if t is None or _storage(t) not in storages:
                    continue
                if id(t) not in copies:
                    value = t.detach().clone()
                    copies[id(t)] = (
                        nn.Parameter(value, t.requires_grad) if isinstance(t, nn.Parameter) else value
                    )
                table[key] = copies[id(t)]  # type: ignore[assignment]  # a Parameter where one was
    return model


def baked(model: nn.Module, *, copy: bool = True, share: bool = False) -> nn.Module:
    """A clone of ``model`` with its masks and parametrizations baked in.

    A pruned tensor is copied once, as its hook computes it (``hook.apply_mask``: ``orig * mask`` in the
    tensor's own dtype, or what a custom pruning method computes): the clone never holds ``weight_orig``, the
    mask or the hook's computed ``weight`` (the clone of a masked model would be three times the model's size
    before baking). Where the model holds one of those tensors anywhere else too (an alias in an attribute),
    the clone is the plain one, baked after. ``copy=False``: ``model`` itself when there is nothing to bake (no
    clone is made then). ``share=True``: the clone holds ``model``'s own :func:`plain_parameters` (it costs
    the baked tensors only); nothing may write into them then (the rebuild never does, and checks it).
    """
    if not copy and not has_pruning_state(model):
        return model
    shared: dict[int, object] = {id(p): p for p in plain_parameters(model)} if share else {}
    pruned = _pruned_tensors(model)
    if not pruned:
        clone = clone_module_with(model, shared)
        bake_masks(clone)
        return clone
    memo: dict[int, object] = dict(shared)
    for (name, _), (hook, orig, mask, computed) in pruned.items():
        memo.update((id(v), v) for v in vars(hook).values() if isinstance(v, torch.Tensor))  # the hook goes
        value = hook.apply_mask(model.get_submodule(name)).detach()  # type: ignore[no-untyped-call]
        if value.untyped_storage().data_ptr() == orig.untyped_storage().data_ptr():
            value = value.clone()  # a pruning method that returns its input: the clone owns its copy
        memo[id(orig)] = nn.Parameter(value, requires_grad=orig.requires_grad)
        memo[id(mask)] = _PLACEHOLDER
        if computed is not None:
            memo[id(computed)] = None
    clone = clone_module_with(model, memo)
    for (name, tensor_name), (_, orig, _, _) in pruned.items():
        _bake_copied(clone.get_submodule(name), tensor_name, cast(nn.Parameter, memo[id(orig)]))
    bake_masks(clone)  # what is left: tied pruned tensors and parametrizations
    return clone


_PLACEHOLDER = torch.empty(0)
Pruned = tuple[prune.BasePruningMethod, nn.Parameter, torch.Tensor, "torch.Tensor | None"]


def _pruned_tensors(model: nn.Module) -> dict[tuple[str, str], Pruned]:
    """(layer, tensor name) -> (hook, ``*_orig``, ``*_mask``, the hook's computed tensor) of every pruned
    tensor that can be baked without copying the rest: none, where any of those tensors is held anywhere but
    in its own slot (an alias; a ``*_orig`` tied to another layer is baked the slow way, keeping the other's
    copy)."""
    held = _held(model)
    out: dict[tuple[str, str], Pruned] = {}
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if not isinstance(hook, prune.BasePruningMethod):
                continue
            tensor_name = hook._tensor_name
            orig = module._parameters.get(tensor_name + "_orig")
            mask = module._buffers.get(tensor_name + "_mask")
            if orig is None or mask is None or held[id(orig)] > 1:
                continue
            computed = module.__dict__.get(tensor_name)
            computed = computed if isinstance(computed, torch.Tensor) else None
            if held[id(mask)] > 1 or (computed is not None and held[id(computed)] > 1):
                return {}
            out[(name, tensor_name)] = (hook, orig, mask, computed)
    return out


def _held(model: nn.Module) -> Counter[int]:
    """How many times each tensor is held by the model's modules, by id."""
    return Counter(id(t) for module in model.modules() for t in _tensors_in(module.__dict__))


def _bake_copied(module: nn.Module, tensor_name: str, value: nn.Parameter) -> None:
    """On a clone whose ``*_orig`` already holds ``orig * mask``: what ``prune.remove`` leaves."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == tensor_name:
            del module._forward_pre_hooks[key]
    del module._parameters[tensor_name + "_orig"]
    del module._buffers[tensor_name + "_mask"]
    module.__dict__.pop(tensor_name, None)
    module.register_parameter(tensor_name, value)


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own.

    ``parametrize`` adds each parametrized tensor as a property of a generated class (``ParametrizedConv2d``),
    which ``deepcopy`` shares between copies; removing the parametrization from one copy deletes the property
    from the class, and so breaks every other copy, the caller's model included.
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)
