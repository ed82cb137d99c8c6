"""The registry of layer types: how each one reads, writes and drops channels.

A channel meets a layer in one of three ways, its :class:`Role`:

* ``MIXING``: every output channel is a weighted sum of the input channels (Conv, ConvTranspose,
  Linear, Embedding; a grouped conv, of those of its group). Such a layer *produces* channels (a zero weight row makes an output channel
  input-independent) and *consumes* them (a zero weight column means the input channel is ignored; a
  constant input channel can be folded into its bias or merged into a carrier channel).
* ``CHANNELWISE``: output channel c depends on input channel c alone (BatchNorm, depthwise conv, PReLU,
  InstanceNorm, a LayerScale parameter, GroupNorm for whole groups). Constants stay constants through it.
* ``BLOCKING``: the layer mixes channels in a way that removing one changes the others (LayerNorm
  statistics, grouped transposed convs, attention, recurrent cells). A group that holds one keeps all
  its channels.

Each layer type has one :class:`Shrinker`, found through the class hierarchy by :func:`shrinker_for`.
Shrinkers build *new* layers (the old one is left as it was), keeping dtype, device, training flag,
``requires_grad`` and every hyperparameter.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import nn

Index = torch.Tensor  # 1-D int64 tensor of channel indices


class Role(str, Enum):
    MIXING = "mixing"
    CHANNELWISE = "channelwise"
    BLOCKING = "blocking"


class Shrinker:
    """How one layer type holds channels. Subclasses override what applies to their role."""

    role: ClassVar[Role] = Role.BLOCKING
    blocking_reason: ClassVar[str] = "layer type mixes channels"
    input_channel_dim: ClassVar[int] = 1  # where a consumer's input holds channels: [N, C, ...]

    def role_of(self, m: Any) -> Role:
        return self.role

    def why_blocking(self, m: Any) -> str:
        return self.blocking_reason

    # --- what the layer computes (MIXING) ---------------------------------------------------------
    def out_rows_zero(self, m: Any, idx: Index) -> torch.Tensor:
        """For each output channel in ``idx``: True if its value does not depend on the layer input."""
        raise NotImplementedError

    def in_cols_zero(self, m: Any, idx: Index) -> torch.Tensor:
        """For each input index in ``idx``: True if no output reads it (all its weights are zero)."""
        raise NotImplementedError

    def can_fold(self, m: Any) -> bool:
        """True if a constant input channel adds the same amount at every output position."""
        return False

    def fold_constant(self, m: Any, idx: Index, k: torch.Tensor) -> None:
        """Add the effect of input indices ``idx`` holding constants ``k`` to the bias (in place)."""
        raise NotImplementedError

    def fold_delta(self, m: Any, idx: Index, k: torch.Tensor) -> torch.Tensor:
        """The effect of input indices ``idx`` holding constants ``k``: one value per output channel."""
        raise NotImplementedError

    def merge_into(self, m: Any, carrier: int, idx: Index, ratio: torch.Tensor) -> None:
        """Linear in its inputs: ``W[:, carrier] += sum_i ratio_i * W[:, idx_i]`` (in place)."""
        raise NotImplementedError

    # --- the shape of the layer --------------------------------------------------------------------
    def out_channels(self, m: Any) -> int | None:
        return None

    def in_channels(self, m: Any) -> int | None:
        return None

    def removable(self, m: Any, side: str, idx: Index) -> Index:
        """The subset of ``idx`` that can be removed from this layer on ``side`` ('out' or 'in')."""
        return idx

    def layout(self, m: Any, side: str, n: int) -> Index:
        """Some ``n`` channels of ``side`` that the layer can keep (to rebuild a saved shape, values loaded after)."""
        return torch.arange(n)

    def why_unremovable(self, m: Any) -> str:
        """Why :meth:`removable` left some channels out."""
        return "can only lose whole groups"

    def merge_unit(self, m: Any, i: int) -> int:
        """Input ``i``'s part of the layer: constants merge only into a carrier in the same part."""
        return 0

    def shrink(self, m: Any, keep_out: Index | None, keep_in: Index | None) -> Any:
        """A new layer holding only ``keep_out`` output and ``keep_in`` input channels."""
        raise NotImplementedError


_REGISTRY: OrderedDict[type, Shrinker] = OrderedDict()


def register(*types: type) -> Callable[[type[Shrinker]], type[Shrinker]]:
    """Class decorator: one shrinker instance serves ``types`` and their subclasses."""

    def wrap(cls: type[Shrinker]) -> type[Shrinker]:
        instance = cls()
        if instance.role is Role.MIXING:
            for method in ("out_rows_zero", "in_cols_zero", "fold_constant", "merge_into", "shrink"):
                if getattr(cls, method) is getattr(Shrinker, method):
                    raise TypeError(f"{cls.__name__} is MIXING but does not define {method}()")
        for t in types:
            _REGISTRY[t] = instance
        return cls

    return wrap


def shrinker_for(m: Any) -> Shrinker | None:
    """The shrinker of ``m``'s class or its nearest registered base class; None if unknown."""
    for cls in type(m).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


# --- helpers ---------------------------------------------------------------------------------------
def _new_like(m: nn.Module, **tensors: torch.Tensor | None) -> nn.Module:
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


def _take(t: torch.Tensor | None, dim: int, idx: Index | None) -> torch.Tensor | None:
    if t is None or idx is None:
        return t
    return t.index_select(dim, idx.to(t.device))


def _zero_along(weight: torch.Tensor, dim: int, idx: Index) -> torch.Tensor:
    w = weight.detach().index_select(dim, idx.to(weight.device)).movedim(dim, 0)
    return (w.reshape(w.shape[0], -1) == 0).all(dim=1).cpu()


# --- convolutions ----------------------------------------------------------------------------------
_ConvNd = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ConvTNd = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _is_depthwise(m: nn.modules.conv._ConvNd) -> bool:
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels


@register(*_ConvNd)
class ConvShrinker(Shrinker):
    """Conv1d/2d/3d. weight: [out, in/groups, *kernel]. Depthwise (groups == in == out) is channelwise.

    A grouped conv is mixing within each group: output channel ``o`` of group ``j`` reads inputs
    ``j * in/groups ...`` only, through weight columns ``0 ... in/groups``. Every group must keep the
    same number of inputs and of outputs (:meth:`removable`), and a constant input folds or merges only
    within its group (:meth:`merge_unit`)."""

    role = Role.MIXING

    def role_of(self, m: nn.Conv2d) -> Role:
        return Role.CHANNELWISE if _is_depthwise(m) else Role.MIXING

    def out_rows_zero(self, m: nn.Conv2d, idx: Index) -> torch.Tensor:
        return _zero_along(m.weight, 0, idx)

    def in_cols_zero(self, m: nn.Conv2d, idx: Index) -> torch.Tensor:
        if m.groups == 1:
            return _zero_along(m.weight, 1, idx)
        w = m.weight.detach()
        return torch.tensor([bool((w[rows, col] == 0).all()) for rows, col in (_grouped_col(m, i) for i in idx.tolist())])

    def can_fold(self, m: nn.Conv2d) -> bool:
        # Every output position sees the whole kernel over constant values: no zero padding reaches it.
        return not _zero_padded(m) or m.padding_mode != "zeros"

    def fold_constant(self, m: nn.Conv2d, idx: Index, k: torch.Tensor) -> None:
        _add_to_bias(m, self.fold_delta(m, idx, k))

    def fold_delta(self, m: nn.Conv2d, idx: Index, k: torch.Tensor) -> torch.Tensor:
        w = m.weight.detach()
        if m.groups == 1:
            return (w[:, idx].flatten(2).sum(-1) * k.to(w)).sum(1)
        delta = torch.zeros(m.out_channels, dtype=w.dtype, device=w.device)
        for i, kk in zip(idx.tolist(), k.tolist()):
            rows, col = _grouped_col(m, i)
            delta[rows] += w[rows, col].flatten(1).sum(-1) * kk
        return delta

    def merge_unit(self, m: nn.Conv2d, i: int) -> int:
        return i // (m.in_channels // m.groups)

    def merge_into(self, m: nn.Conv2d, carrier: int, idx: Index, ratio: torch.Tensor) -> None:
        with torch.no_grad():
            w = m.weight
            if m.groups == 1:
                shape = (1, -1) + (1,) * (w.dim() - 2)
                w[:, carrier] += (w[:, idx] * ratio.to(w).view(shape)).sum(1)
                return
            rows, into = _grouped_col(m, carrier)
            for i, r in zip(idx.tolist(), ratio.tolist()):
                their_rows, col = _grouped_col(m, i)
                if their_rows != rows:
                    raise ValueError(f"input {i} is in another group than carrier {carrier}")
                w[rows, into] += w[rows, col] * r

    def out_channels(self, m: nn.Conv2d) -> int:
        return m.out_channels

    def in_channels(self, m: nn.Conv2d) -> int:
        return m.in_channels

    def removable(self, m: nn.Conv2d, side: str, idx: Index) -> Index:
        if m.groups == 1 or _is_depthwise(m):
            return idx
        return _balanced(idx, m.groups, (m.out_channels if side == "out" else m.in_channels) // m.groups)

    def why_unremovable(self, m: nn.Conv2d) -> str:
        return f"grouped conv (groups={m.groups}) loses the same number of channels in every group"

    def layout(self, m: nn.Conv2d, side: str, n: int) -> Index:
        if m.groups == 1 or _is_depthwise(m):
            return torch.arange(n)
        if n % m.groups:
            raise ValueError(f"{n} {side}put channels do not split into {m.groups} groups")
        per = (m.out_channels if side == "out" else m.in_channels) // m.groups
        return torch.tensor([g * per + i for g in range(m.groups) for i in range(n // m.groups)], dtype=torch.long)

    def shrink(self, m: nn.Conv2d, keep_out: Index | None, keep_in: Index | None) -> nn.Conv2d:
        if _is_depthwise(m):
            keep = keep_out if keep_out is not None else keep_in
            assert keep is not None
            new = _new_like(m, weight=_take(m.weight, 0, keep), bias=_take(m.bias, 0, keep))
            new.in_channels = new.out_channels = new.groups = len(keep)
            return new
        if keep_out is not None and m.groups > 1:
            _check_balanced(keep_out, m.groups, m.out_channels // m.groups, "outputs")
        weight = _take(m.weight, 0, keep_out)
        if keep_in is not None:
            weight = weight.index_select(1, keep_in.to(weight.device)) if m.groups == 1 else _grouped_cols(m, weight, keep_in)
        new = _new_like(m, weight=weight, bias=_take(m.bias, 0, keep_out))
        new.out_channels = len(keep_out) if keep_out is not None else m.out_channels
        new.in_channels = len(keep_in) if keep_in is not None else m.in_channels
        _check_groups(new)
        return new


def _grouped_col(m: nn.modules.conv._ConvNd, i: int) -> tuple[slice, int]:
    """Input ``i`` of a grouped conv: the weight rows of its group, and its column there."""
    group, col = divmod(i, m.in_channels // m.groups)
    per = m.out_channels // m.groups
    return slice(group * per, (group + 1) * per), col


def _grouped_cols(m: nn.modules.conv._ConvNd, weight: torch.Tensor, keep_in: Index) -> torch.Tensor:
    """``weight`` (rows already taken) keeping inputs ``keep_in`` of each group in that group's rows."""
    per_in, rows = m.in_channels // m.groups, weight.shape[0] // m.groups
    _check_balanced(keep_in, m.groups, per_in, "inputs")
    parts = []
    for g in range(m.groups):
        cols = [i - g * per_in for i in keep_in.tolist() if i // per_in == g]
        parts.append(weight[g * rows : (g + 1) * rows].index_select(1, torch.tensor(cols, dtype=torch.long, device=weight.device)))
    return torch.cat(parts, 0)


def _balanced(idx: Index, groups: int, per: int) -> Index:
    """The largest subset of ``idx`` that takes the same number from each of ``groups`` runs of ``per``."""
    by_group: list[list[int]] = [[] for _ in range(groups)]
    for i in sorted(set(idx.tolist())):
        by_group[i // per].append(i)
    n = min(len(b) for b in by_group)
    return torch.tensor(sorted(i for b in by_group for i in b[:n]), dtype=torch.long)


def _check_balanced(keep: Index, groups: int, per: int, what: str) -> None:
    counts = torch.bincount(keep // per, minlength=groups).tolist()
    if len(set(counts)) != 1:
        raise ValueError(f"unbalanced {what} for a conv with {groups} groups: {counts}")


def _check_groups(m: nn.modules.conv._ConvNd) -> None:
    if m.in_channels % m.groups or m.out_channels % m.groups:
        raise ValueError(f"{m.in_channels} in and {m.out_channels} out channels do not split into {m.groups} groups")


@register(*_ConvTNd)
class ConvTransposeShrinker(Shrinker):
    """ConvTranspose1d/2d/3d. weight: [in, out/groups, *kernel]. Constant inputs vary at the borders."""

    role = Role.MIXING

    def role_of(self, m: nn.ConvTranspose2d) -> Role:
        return Role.MIXING if m.groups == 1 else Role.BLOCKING

    def why_blocking(self, m: nn.ConvTranspose2d) -> str:
        return f"grouped transposed conv (groups={m.groups})"

    def out_rows_zero(self, m: nn.ConvTranspose2d, idx: Index) -> torch.Tensor:
        return _zero_along(m.weight, 1, idx)

    def in_cols_zero(self, m: nn.ConvTranspose2d, idx: Index) -> torch.Tensor:
        return _zero_along(m.weight, 0, idx)

    def fold_constant(self, m: nn.ConvTranspose2d, idx: Index, k: torch.Tensor) -> None:
        raise NotImplementedError("a transposed conv spreads a constant unevenly; merge into a carrier")

    def merge_into(self, m: nn.ConvTranspose2d, carrier: int, idx: Index, ratio: torch.Tensor) -> None:
        with torch.no_grad():
            w = m.weight
            shape = (-1,) + (1,) * (w.dim() - 1)
            w[carrier] += (w[idx] * ratio.to(w).view(shape)).sum(0)

    def out_channels(self, m: nn.ConvTranspose2d) -> int:
        return m.out_channels

    def in_channels(self, m: nn.ConvTranspose2d) -> int:
        return m.in_channels

    def shrink(self, m: nn.ConvTranspose2d, keep_out: Index | None, keep_in: Index | None) -> nn.ConvTranspose2d:
        new = _new_like(m, weight=_take(_take(m.weight, 1, keep_out), 0, keep_in), bias=_take(m.bias, 0, keep_out))
        new.out_channels = len(keep_out) if keep_out is not None else m.out_channels
        new.in_channels = len(keep_in) if keep_in is not None else m.in_channels
        return new


def _zero_padded(m: nn.modules.conv._ConvNd) -> bool:
    """Any padding at all (``padding="same"`` pads unless every kernel extent is 1)."""
    if m.padding == "valid":
        return False
    if m.padding == "same":
        return any(p != 0 for p in m._reversed_padding_repeated_twice)
    return any(int(p) != 0 for p in (m.padding if isinstance(m.padding, (tuple, list)) else (m.padding,)))


def _add_to_bias(m: nn.Module, delta: torch.Tensor) -> None:
    """``m.bias += delta``, creating a bias where the layer had none."""
    with torch.no_grad():
        if m.bias is None:
            m.bias = nn.Parameter(delta.clone(), requires_grad=m.weight.requires_grad)
        else:
            m.bias += delta.to(m.bias)


# --- linear ----------------------------------------------------------------------------------------
@register(nn.Linear)
class LinearShrinker(Shrinker):
    """Linear. weight: [out, in]. A constant input always folds into the bias."""

    role = Role.MIXING
    input_channel_dim = -1

    def out_rows_zero(self, m: nn.Linear, idx: Index) -> torch.Tensor:
        return _zero_along(m.weight, 0, idx)

    def in_cols_zero(self, m: nn.Linear, idx: Index) -> torch.Tensor:
        return _zero_along(m.weight, 1, idx)

    def can_fold(self, m: nn.Linear) -> bool:
        return True

    def fold_constant(self, m: nn.Linear, idx: Index, k: torch.Tensor) -> None:
        _add_to_bias(m, self.fold_delta(m, idx, k))

    def fold_delta(self, m: nn.Linear, idx: Index, k: torch.Tensor) -> torch.Tensor:
        w = m.weight.detach()
        return (w[:, idx] * k.to(w)).sum(1)

    def merge_into(self, m: nn.Linear, carrier: int, idx: Index, ratio: torch.Tensor) -> None:
        with torch.no_grad():
            m.weight[:, carrier] += (m.weight[:, idx] * ratio.to(m.weight)).sum(1)

    def out_channels(self, m: nn.Linear) -> int:
        return m.out_features

    def in_channels(self, m: nn.Linear) -> int:
        return m.in_features

    def shrink(self, m: nn.Linear, keep_out: Index | None, keep_in: Index | None) -> nn.Linear:
        new = _new_like(m, weight=_take(_take(m.weight, 0, keep_out), 1, keep_in), bias=_take(m.bias, 0, keep_out))
        new.out_features = len(keep_out) if keep_out is not None else m.out_features
        new.in_features = len(keep_in) if keep_in is not None else m.in_features
        return new


@register(nn.Embedding)
class EmbeddingShrinker(Shrinker):
    """Embedding produces channels only (weight: [num_embeddings, dim]); a zero column emits 0."""

    role = Role.MIXING

    def out_rows_zero(self, m: nn.Embedding, idx: Index) -> torch.Tensor:
        return _zero_along(m.weight, 1, idx)

    def in_cols_zero(self, m: nn.Embedding, idx: Index) -> torch.Tensor:
        return torch.zeros(len(idx), dtype=torch.bool)

    def fold_constant(self, m: nn.Embedding, idx: Index, k: torch.Tensor) -> None:
        raise NotImplementedError("an embedding has no input channels")

    def merge_into(self, m: nn.Embedding, carrier: int, idx: Index, ratio: torch.Tensor) -> None:
        raise NotImplementedError("an embedding has no input channels")

    def out_channels(self, m: nn.Embedding) -> int:
        return m.embedding_dim

    def shrink(self, m: nn.Embedding, keep_out: Index | None, keep_in: Index | None) -> nn.Embedding:
        new = _new_like(m, weight=_take(m.weight, 1, keep_out))
        new.embedding_dim = len(keep_out) if keep_out is not None else m.embedding_dim
        return new


# --- channelwise layers ----------------------------------------------------------------------------
@register(nn.modules.batchnorm._BatchNorm)
class BatchNormShrinker(Shrinker):
    role = Role.CHANNELWISE

    def out_channels(self, m: nn.BatchNorm2d) -> int:
        return m.num_features

    in_channels = out_channels

    def shrink(self, m: nn.BatchNorm2d, keep_out: Index | None, keep_in: Index | None) -> nn.BatchNorm2d:
        keep = keep_out if keep_out is not None else keep_in
        new = _new_like(
            m,
            weight=_take(m.weight, 0, keep),
            bias=_take(m.bias, 0, keep),
            running_mean=_take(m.running_mean, 0, keep),
            running_var=_take(m.running_var, 0, keep),
        )
        new.num_features = len(keep) if keep is not None else m.num_features
        return new


@register(nn.modules.instancenorm._InstanceNorm)
class InstanceNormShrinker(BatchNormShrinker):
    """InstanceNorm normalises each channel on its own: channelwise like BatchNorm."""


@register(nn.PReLU)
class PReLUShrinker(Shrinker):
    role = Role.CHANNELWISE

    def out_channels(self, m: nn.PReLU) -> int | None:
        return m.num_parameters if m.num_parameters > 1 else None

    in_channels = out_channels

    def shrink(self, m: nn.PReLU, keep_out: Index | None, keep_in: Index | None) -> nn.PReLU:
        if m.num_parameters == 1:
            return m
        keep = keep_out if keep_out is not None else keep_in
        new = _new_like(m, weight=_take(m.weight, 0, keep))
        new.num_parameters = len(keep) if keep is not None else m.num_parameters
        return new


@register(nn.GroupNorm)
class GroupNormShrinker(Shrinker):
    """GroupNorm normalises each group on its own: whole groups can go, single channels cannot."""

    role = Role.CHANNELWISE

    def out_channels(self, m: nn.GroupNorm) -> int:
        return m.num_channels

    in_channels = out_channels

    def removable(self, m: nn.GroupNorm, side: str, idx: Index) -> Index:
        size = m.num_channels // m.num_groups
        chosen = set(idx.tolist())
        whole = [g for g in range(m.num_groups) if all(c in chosen for c in range(g * size, (g + 1) * size))]
        keep = [c for g in whole for c in range(g * size, (g + 1) * size)]
        return torch.tensor(sorted(keep), dtype=torch.long)

    def shrink(self, m: nn.GroupNorm, keep_out: Index | None, keep_in: Index | None) -> nn.GroupNorm:
        keep = keep_out if keep_out is not None else keep_in
        assert keep is not None
        new = _new_like(m, weight=_take(m.weight, 0, keep), bias=_take(m.bias, 0, keep))
        new.num_groups = len(keep) // (m.num_channels // m.num_groups)
        new.num_channels = len(keep)
        return new


@register(nn.Parameter)
class ParameterShrinker(Shrinker):
    """A bare parameter multiplied into a channel stream (LayerScale): channelwise along its pruning dim."""

    role = Role.CHANNELWISE


# --- blocking layers -------------------------------------------------------------------------------
@register(nn.LayerNorm)
class LayerNormShrinker(Shrinker):
    role = Role.BLOCKING
    blocking_reason = "LayerNorm statistics include every channel, so removing one changes the others"


@register(nn.MultiheadAttention, nn.LSTM, nn.GRU, nn.RNN)
class SequenceShrinker(Shrinker):
    role = Role.BLOCKING
    blocking_reason = "attention and recurrent layers are not compacted yet"
