"""The shrinker protocol and its registry: the one extension point for per-layer-type behaviour.

A channel meets a layer in one of three ways, its :class:`Role`:

* ``MIXING``: every output channel is a weighted sum of the input channels (Conv, ConvTranspose,
  Linear, Embedding; a grouped conv, of those of its group). Such a layer *produces* channels (a zero
  weight row makes an output channel input-independent) and *consumes* them (a zero weight column means
  the input channel is ignored; a constant input channel can be folded into its bias or merged into a
  carrier channel).
* ``CHANNELWISE``: output channel c depends on input channel c alone (BatchNorm, depthwise conv, PReLU,
  InstanceNorm, a LayerScale parameter, GroupNorm for whole groups). Constants stay constants through it.
* ``BLOCKING``: the layer mixes channels in a way that removing one changes the others (LayerNorm
  statistics, grouped transposed convs, attention, recurrent cells). A group that holds one keeps all
  its channels.

Each layer type has one :class:`Shrinker`, found through the class hierarchy by :func:`shrinker_for`.
Everything compactor does with a layer goes through it: zero tests, folding and merging constants, what
the layer can lose, rebuilding it smaller, the attributes the safetensors manifest records, and (for a
type Torch-Pruning does not know) how the tracer sees it. :func:`register` checks that a shrinker defines
every method its role needs. Shrinkers build *new* layers (the old one is left as it was), keeping
dtype, device, training flag, ``requires_grad`` and every hyperparameter.
"""

from __future__ import annotations

import copy
import sys
import weakref
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

Index = torch.Tensor  # 1-D int64 tensor of channel indices
M = TypeVar("M")


class Role(str, Enum):
    MIXING = "mixing"
    CHANNELWISE = "channelwise"
    BLOCKING = "blocking"


class Side(str, Enum):
    """Which side of a layer a channel is on: ``OUT`` the layer writes it, ``IN`` the layer reads it."""

    OUT = "out"
    IN = "in"


class Shrinker(Generic[M]):
    """How one layer type holds channels. Subclasses override what their role needs (see :data:`PROTOCOL`)."""

    role: ClassVar[Role] = Role.BLOCKING
    blocking_reason: ClassVar[str] = "layer type mixes channels"
    input_channel_dim: ClassVar[int] = 1  # where a consumer's input holds channels: [N, C, ...]
    output_channel_dim: ClassVar[int | None] = None  # where its output holds them (None: input_channel_dim)
    # Constructor attributes that fix the layer's shape, recorded in the safetensors manifest and checked
    # when a saved layer is rebuilt (io/safetensors.py).
    shape_attrs: ClassVar[tuple[str, ...]] = ()

    def role_of(self, m: M) -> Role:
        return self.role

    def why_blocking(self, m: M) -> str:
        return self.blocking_reason

    def expected_shapes(self, m: M) -> dict[str, tuple[int | None, ...]]:
        """What the layer's attributes say its tensors' shapes are (``None``: any size there), so that a
        layer whose attributes and weights disagree (built or edited inconsistently) is refused before any
        work. Empty: nothing to check."""
        return {}

    # --- the shape of the layer (every role) -----------------------------------------------------
    def out_channels(self, m: M) -> int | None:
        """How many channels the layer writes (None: it has no channel dimension of its own)."""
        raise NotImplementedError

    def in_channels(self, m: M) -> int | None:
        """How many channels the layer reads (a channelwise layer: its outputs)."""
        raise NotImplementedError

    # --- what the layer computes (MIXING) ---------------------------------------------------------
    def out_rows_zero(self, m: M, idx: Index) -> torch.Tensor:
        """For each output channel in ``idx``: True if its value does not depend on the layer input."""
        raise NotImplementedError

    def in_cols_zero(self, m: M, idx: Index) -> torch.Tensor:
        """For each input index in ``idx``: True if no output reads it (all its weights are zero)."""
        raise NotImplementedError

    def can_fold(self, m: M) -> bool:
        """True if a constant input channel adds the same amount at every output position."""
        return False

    def fold_delta(self, m: M, idx: Index, k: torch.Tensor) -> torch.Tensor:
        """The effect of input indices ``idx`` holding constants ``k``: one value per output channel."""
        raise NotImplementedError

    def fold_constant(self, m: M, idx: Index, k: torch.Tensor) -> None:
        """Add the effect of input indices ``idx`` holding constants ``k`` to the bias (in place; a layer
        built without a bias gets one)."""
        add_to_bias(m, self.fold_delta(m, idx, k))

    def merge_into(self, m: M, carrier: int, idx: Index, ratio: torch.Tensor) -> None:
        """Linear in its inputs: ``W[:, carrier] += sum_i ratio_i * W[:, idx_i]`` (in place)."""
        raise NotImplementedError

    # The parameters each in-place step writes (None: any of the layer's): a rebuild shares every other
    # tensor with the model it copies, and refuses to return if one of those was written.
    fold_writes: ClassVar[tuple[str, ...] | None] = ("bias",)
    merge_writes: ClassVar[tuple[str, ...] | None] = ("weight",)
    shift_writes: ClassVar[tuple[str, ...] | None] = None

    def merge_unit(self, m: M, i: int) -> int:
        """Input ``i``'s part of the layer: constants merge only into a carrier in the same part."""
        return 0

    # --- what the layer does to a channel's value (CHANNELWISE) -----------------------------------
    def forgets_input(self, m: M, idx: Index) -> torch.Tensor:
        """For each channel in ``idx``: True if the output ignores the input there (a norm with weight 0)."""
        return torch.zeros(len(idx), dtype=torch.bool)

    def border_values(self, m: M, idx: Index, k: torch.Tensor) -> torch.Tensor | None:
        """Channels ``idx`` holding constants ``k`` (float64) on the way in: what comes out at each *border
        pattern* (which part of the layer's window lies inside the input) that occurs at any input size,
        ``[len(idx), patterns]`` in float64, the patterns in one order for every channel. None where a
        constant comes out as a constant at every position (the default: the layer acts on each position
        alone). A zero-padded depthwise conv defines it."""
        return None

    def can_absorb_shift(self, m: M) -> bool:
        """True if a constant removed from the layer's input can be made up inside it (:meth:`absorb_shift`)."""
        return False

    def absorb_shift(self, m: M, delta: torch.Tensor) -> None:
        """The layer's input will be ``delta`` lower per channel from now on: keep the output unchanged (in place)."""
        raise NotImplementedError

    # --- what the layer can lose, and its smaller copy ---------------------------------------------
    def removable(self, m: M, side: Side, idx: Index) -> Index:
        """The subset of ``idx`` that can be removed from this layer on ``side``."""
        return idx

    def why_unremovable(self, m: M) -> str:
        """Why :meth:`removable` left some channels out."""
        return "can only lose whole groups"

    def what_would_remove(self, m: M, side: Side, idx: Index) -> str:
        """What further zeroed channels would let every one of ``idx`` go (after :meth:`removable` left some
        out), in words; "" where there is nothing short to say."""
        return ""

    def channel_params(self, m: M, side: Side) -> dict[str, int]:
        """The layer's own parameters that hold a channel of ``side`` (a channelwise layer: either side), each
        with the dimension that holds it: one channel there holds ``numel // width`` entries of each.
        ``compactor.prune_channels`` masks a writer's (``Side.OUT``) and counts what a removal saves. Empty
        (the default): the layer's channels cannot be masked, and its groups are left whole."""
        return {}

    def layout(self, m: M, side: Side, n: int) -> Index:
        """Some ``n`` channels of ``side`` that the layer can keep (to rebuild a saved shape, values loaded after)."""
        return torch.arange(n)

    def shrink(self, m: M, keep_out: Index | None, keep_in: Index | None) -> M:
        """A new layer holding only ``keep_out`` output and ``keep_in`` input channels."""
        raise NotImplementedError

    def probe_inputs(self, m: M) -> list[torch.Tensor]:
        """Small inputs the layer accepts, to check that a subclass with a forward of its own still computes
        the registered type's (:func:`own_forward`), at every size where that could differ (a conv: every
        size modulo its stride). None given: it cannot be checked, so such a subclass is kept whole."""
        return []

    def known_variant(self, m: M) -> str | None:
        """Where ``m``'s class has a forward of its own: the variant of the registered type's function it
        computes, which this shrinker's other methods account for (a conv that pads its input in the forward
        as TensorFlow's 'SAME' does), in a few words; None (the default) for no variant it knows."""
        return None


# What each role needs a shrinker to define (the rest has a safe default). ``register`` checks it.
PROTOCOL: dict[Role, tuple[str, ...]] = {
    Role.BLOCKING: ("out_channels", "in_channels"),
    Role.CHANNELWISE: ("out_channels", "in_channels", "shrink"),
    Role.MIXING: (
        "out_channels",
        "in_channels",
        "shrink",
        "out_rows_zero",
        "in_cols_zero",
        "fold_delta",
        "merge_into",
    ),
}

_REGISTRY: OrderedDict[type, Shrinker[Any]] = OrderedDict()


def register(*types: type) -> Callable[[type[Shrinker[Any]]], type[Shrinker[Any]]]:
    """Class decorator: one shrinker instance serves ``types`` and their subclasses.

    Raises ``TypeError`` when the shrinker leaves out a method its role needs (:data:`PROTOCOL`), when
    ``types`` is empty, or when a type already has another shrinker.
    """
    if not types:
        raise TypeError("register() needs at least one layer type")

    def wrap(cls: type[Shrinker[Any]]) -> type[Shrinker[Any]]:
        if not isinstance(cls.role, Role):
            raise TypeError(f"{cls.__name__}.role must be a Role, found {cls.role!r}")
        missing = [m for m in PROTOCOL[cls.role] if getattr(cls, m) is getattr(Shrinker, m)]
        if missing:
            raise TypeError(
                f"{cls.__name__} is {cls.role.value} but does not define {', '.join(m + '()' for m in missing)}"
            )
        if cls.role is Role.CHANNELWISE and (cls.can_absorb_shift is not Shrinker.can_absorb_shift) != (
            cls.absorb_shift is not Shrinker.absorb_shift
        ):
            raise TypeError(f"{cls.__name__} must define can_absorb_shift() and absorb_shift() together")
        instance = cls()
        for t in types:
            old = type(_REGISTRY[t]) if t in _REGISTRY else None
            if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
                raise TypeError(
                    f"{t.__name__} already has a shrinker ({old.__name__})"
                )  # a reload may replace its own
            _REGISTRY[t] = instance
        return cls

    return wrap


# Layer types of packages compactor does not import (importing transformers takes seconds), by module and
# qualified name: each is registered the first time its class is met, once its module is imported anyway.
_BY_NAME: dict[tuple[str, str], type[Shrinker[Any]]] = {}


def register_by_name(module: str, qualname: str) -> Callable[[type[Shrinker[Any]]], type[Shrinker[Any]]]:
    """Class decorator: like :func:`register` for the class ``module.qualname``, without importing
    ``module``. The shrinker is checked now and serves the class once something else has imported it."""

    def wrap(cls: type[Shrinker[Any]]) -> type[Shrinker[Any]]:
        register(_Unloaded)(cls)  # checks the protocol; the placeholder type is never met
        del _REGISTRY[_Unloaded]
        _BY_NAME[(module, qualname)] = cls
        return cls

    return wrap


class _Unloaded:
    """The placeholder a by-name shrinker is checked against."""


def _resolve_by_name() -> None:
    """Register every by-name layer type whose module is imported by now."""
    for (module, qualname), cls in list(_BY_NAME.items()):
        loaded = sys.modules.get(module)
        t = getattr(loaded, qualname, None) if loaded is not None else None
        if isinstance(t, type):
            del _BY_NAME[(module, qualname)]
            register(t)(cls)


def shrinker_for(m: Any) -> Shrinker[Any] | None:
    """The shrinker of ``m``'s class or its nearest registered base class; None if unknown."""
    mro = type(m).__mro__
    if _BY_NAME and any((c.__module__, c.__qualname__) in _BY_NAME for c in mro):
        _resolve_by_name()
    for cls in mro:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def shrinker_of_type(t: type) -> Shrinker[Any]:
    """The shrinker registered for ``t`` itself (``KeyError`` if none)."""
    _resolve_by_name()
    return _REGISTRY[t]


def registered_types() -> tuple[type, ...]:
    """Every layer type with a shrinker, in registration order (by-name types once their module is imported)."""
    _resolve_by_name()
    return tuple(_REGISTRY)


def inconsistency(name: str, m: Any) -> str | None:
    """Why layer ``m`` cannot be compacted as it is (its attributes and tensors disagree, or it has no
    channels), or None."""
    shrinker = shrinker_for(m)
    if shrinker is None:
        return None
    widths = (("output", shrinker.out_channels(m)), ("input", shrinker.in_channels(m)))
    for attr in shrinker.shape_attrs:
        value = getattr(m, attr, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            return f"layer {name} ({type(m).__name__}) has {attr}={value!r}, not a whole number"
    for side, w in widths:
        if w is not None and w <= 0:
            return f"layer {name} ({type(m).__name__}) has {w} {side} channels"
    for tensor, shape in shrinker.expected_shapes(m).items():
        t = getattr(m, tensor, None)
        if not isinstance(t, torch.Tensor) or nn.parameter.is_lazy(t):
            continue
        actual = tuple(t.shape)
        if len(actual) < len(shape) or any(e is not None and a != e for a, e in zip(actual, shape)):
            wanted = "x".join("*" if e is None else str(e) for e in shape)
            return f"layer {name} ({type(m).__name__}) has {tensor} of shape {actual}, but its attributes say {wanted}"
    return None


def own_forward(m: Any) -> str | None:
    """Why compactor cannot take ``m`` for the layer type its shrinker knows, or None.

    A subclass of a mixing type (Conv2d, Linear) that overrides ``forward`` may not compute that type's
    function of its weights: timm's ``ScaledStdConv2d`` standardises each weight row in the forward, so removing
    an input column changes the row's mean and variance (every other weight moves), and its ``gain`` holds
    one value per output channel that the shrinker does not know to slice. Such a layer is kept whole unless
    its forward gives the registered type's forward's output on a probe input (timm's ``Linear``, a subclass
    that only adds a type annotation, does), or computes a variant its shrinker knows
    (:meth:`Shrinker.known_variant`: timm's ``Conv2dSame``)."""
    shrinker = shrinker_for(m)
    if shrinker is None or shrinker.role is not Role.MIXING or not isinstance(m, nn.Module):
        return None
    known = next(cls for cls in type(m).__mro__ if cls in _REGISTRY)
    base: Any = known
    if type(m).forward is base.forward or shrinker.known_variant(m) is not None:
        return None
    why = (
        f"{type(m).__name__} has a forward of its own that does not compute {known.__name__}'s on its weights "
        f"(weight standardisation, say): its channels are kept"
    )
    xs = shrinker.probe_inputs(m)
    if not xs:
        return why
    try:
        with torch.no_grad():
            same = all(torch.allclose(m(x), base.forward(m, x), rtol=1e-5, atol=1e-6) for x in xs)
    except Exception:  # any failure of the probe: the subclass is not the known layer
        return why
    return None if same else why


def role_of(m: Any) -> Role | None:
    """``m``'s role, or None for a type compactor does not know."""
    shrinker = shrinker_for(m) if m is not None else None
    return shrinker.role_of(m) if shrinker is not None else None


def width(m: Any, side: Side) -> int | None:
    """How many channels ``m`` has on ``side`` (None for an unknown type or no channel dimension)."""
    shrinker = shrinker_for(m) if m is not None else None
    if shrinker is None:
        return None
    return shrinker.out_channels(m) if side is Side.OUT else shrinker.in_channels(m)


# --- helpers for shrinkers -------------------------------------------------------------------------
T = TypeVar("T", bound=nn.Module)


def new_like(m: T, **tensors: torch.Tensor | None) -> T:
    """A new module of ``m``'s class and attributes, with the named parameters/buffers replaced."""
    new = copy.copy(m)
    new._parameters = OrderedDict(m._parameters)
    new._buffers = OrderedDict(m._buffers)
    new._modules = OrderedDict(m._modules)
    for name, value in tensors.items():
        if name in m._parameters:
            old = m._parameters[name]
            if value is None or old is None:
                new._parameters[name] = None
            else:
                new._parameters[name] = nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
        elif name in m._buffers:
            new._buffers[name] = None if value is None else value.detach().clone()
        else:
            raise KeyError(f"{type(m).__name__} has no parameter or buffer {name!r}")
    return new


def take(t: torch.Tensor | None, dim: int, idx: Index | None) -> torch.Tensor | None:
    """``t`` with only ``idx`` along ``dim`` (``t`` itself when either is None)."""
    if t is None or idx is None:
        return t
    return t.index_select(dim, idx.to(t.device))


def must_take(t: torch.Tensor, dim: int, idx: Index | None) -> torch.Tensor:
    """:func:`take` of a tensor that is there."""
    return t if idx is None else t.index_select(dim, idx.to(t.device))


def zero_along(weight: torch.Tensor, dim: int, idx: Index) -> torch.Tensor:
    """For each index of ``idx`` along ``dim``: True if that slice of ``weight`` is all zero (worked out on a
    boolean map of the weight, a quarter of its size: no copy of a large weight is made). The answer per
    slice is kept while ``weight`` lives and is not written (planning and the report ask it several times)."""
    entry = _ZERO_SLICES.get(id(weight))
    if entry is None or entry[0]() is not weight:
        gone = id(weight)
        entry = (weakref.ref(weight, lambda _: _ZERO_SLICES.pop(gone, None)), {})
        _ZERO_SLICES[gone] = entry
    seen, key = entry[1], (dim, weight._version)
    if key not in seen:
        zero = weight.detach() == 0
        others = tuple(d for d in range(zero.dim()) if d != dim)
        seen[key] = (zero.all(dim=others) if others else zero).cpu()
    return seen[key].index_select(0, idx.cpu())


# id(weight) -> (a weak reference to it, (dim, version) -> which slices are zero); an entry goes with its tensor
_ZERO_SLICES: dict[int, tuple[weakref.ref[torch.Tensor], dict[tuple[int, int], torch.Tensor]]] = {}


def add_to_bias(m: Any, delta: torch.Tensor) -> None:
    """``m.bias += delta``, creating a bias where the layer had none."""
    with torch.no_grad():
        if m.bias is None:
            m.bias = nn.Parameter(delta.clone().to(m.weight), requires_grad=m.weight.requires_grad)
        else:
            m.bias += delta.to(m.bias)
