"""Load a model from a weights file plus its architecture: ``--arch module:callable``.

Most pruned models live as a ``state_dict`` (``torch.save(model.state_dict(), path)``) or a PyTorch
Lightning ``.ckpt``, not as a pickled module. Here the architecture is built by calling
``module:callable`` with no arguments (the DENSE model, as before pruning), then the weights are loaded
into it. The file is read with ``torch.load(weights_only=True)``: nothing in it runs code.

Accepted layouts:

* a plain ``state_dict`` (``torch.save`` or ``.safetensors``; a tied tensor stored once fills its aliases);
* a ``.safetensors`` file written by compactor (compacted or sparse storage): handed to
  :func:`compactor.io.load.load`, which rebuilds the layers to the shapes in its manifest;
* a ``state_dict`` with ``torch.nn.utils.prune`` keys ``<name>_orig`` + ``<name>_mask``: they become
  ``<name> = orig * mask`` (what the pruning hook computes on every forward), so the masks turn into zeros;
* a checkpoint dict with a ``"state_dict"`` entry (PyTorch Lightning): the LightningModule attribute
  that holds the model (``model.``, ``net.``...) is stripped. The prefix is detected as the one that makes
  the most keys match the architecture, or chosen with ``prefix``. Other entries of the checkpoint
  (hyper-parameters, loop and callback state) may name classes the safe loader does not know; they are
  read into inert stand-ins that hold data and run nothing, and then dropped.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputFileError, StateDictError, first_line
from .arch import Arch, build_arch
from .pt import check_torch_file
from .safetensors import MANIFEST_KEY, read_metadata
from .sparse import load_written

MASK_SUFFIX = "_mask"
ORIG_SUFFIX = "_orig"
_SHOWN = 3  # keys named in a message


# --- the file --------------------------------------------------------------------------------------
def load_state_dict_model(
    path: str | os.PathLike[str], arch: Arch, *, prefix: str | None = None
) -> nn.Module:
    """Build ``arch`` (``"module:callable"``, or a builder) and load the weights of ``path`` into it, safely.

    ``prefix``: the key prefix to strip (e.g. ``"model."`` for a LightningModule whose model is
    ``self.model``); ``None`` detects it. Keys outside the prefix are ignored. Raises
    :class:`~compactor.errors.InputFileError` subclasses with one line each.
    """
    file = Path(path)
    if file.suffix.lower() == ".safetensors" and _has_manifest(file):
        return load_written(
            file, arch
        )  # written by compactor (maybe compacted or sparse): rebuild to its shapes
    model = build_arch(arch)
    state = read_state_dict(file)
    expected = model.state_dict()
    state = strip_prefix(state, set(expected), prefix, file)
    state = _fill_tied(apply_masks(state), expected)
    check_fits(
        state,
        expected,
        file,
        arch if isinstance(arch, str) else getattr(arch, "__name__", type(arch).__name__),
    )
    model.load_state_dict(state, strict=True)
    return model


PARAMETRIZATIONS = ".parametrizations."


def _apply_parametrizations(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not any(PARAMETRIZATIONS in k for k in state):
        return state
    out = {k: v for k, v in state.items() if PARAMETRIZATIONS not in k}
    for key, original in state.items():
        if PARAMETRIZATIONS not in key or not key.endswith(".original"):
            continue
        module, _, rest = key.partition(PARAMETRIZATIONS)
        name = rest[: -len(".original")]
        masks = sorted(
            k for k in state if k.startswith(f"{module}{PARAMETRIZATIONS}{name}.") and k.endswith(".mask")
        )
        if not masks:  # torch.ao.pruning keeps its masks in non-persistent buffers: they are not in the file
            raise StateDictError(
                f"{key} is a parametrized weight saved without its mask (torch.ao.pruning does not save masks); "
                f"call sparsifier.squash_mask() before model.state_dict(), then save again"
            )
        value = original
        for mask_key in masks:
            value = value * _broadcast_mask(state[mask_key], value, mask_key)
        out[f"{module}.{name}"] = value
    unknown = [k for k in state if PARAMETRIZATIONS in k and not k.endswith((".original", ".mask"))]
    if unknown:
        raise StateDictError(
            f"{unknown[0]} belongs to a parametrization compactor cannot apply without its code; "
            f"bake it before saving (sparsifier.squash_mask() or parametrize.remove_parametrizations)"
        )
    return out


def _broadcast_mask(mask: torch.Tensor, value: torch.Tensor, key: str) -> torch.Tensor:
    if mask.shape == value.shape:
        return mask.to(value.dtype)
    if mask.dim() == 1 and value.dim() >= 1 and mask.shape[0] == value.shape[0]:  # one entry per row
        return mask.to(value.dtype).view(-1, *([1] * (value.dim() - 1)))
    raise StateDictError(
        f"mask {key} has shape {tuple(mask.shape)}, which does not fit {tuple(value.shape)}; "
        f"bake the parametrization before saving (sparsifier.squash_mask())"
    )


def _fill_tied(
    state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A tied tensor saved once (``safetensors.torch.save_model`` drops the duplicates) fills its aliases."""
    by_storage: dict[int, str] = {}
    for key, tensor in expected.items():
        if key in state:
            by_storage.setdefault(tensor.untyped_storage().data_ptr(), key)
    filled = dict(state)
    for key, tensor in expected.items():
        source = by_storage.get(tensor.untyped_storage().data_ptr())
        if key not in filled and source is not None and expected[source].shape == tensor.shape:
            filled[key] = state[source]
    return filled


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict file (``torch.save`` or safetensors) or of a checkpoint's ``"state_dict"``."""
    if file.suffix.lower() == ".safetensors":
        return _read_safetensors(file)
    check_torch_file(
        file, kind="weights", fix="save the weights", save_call="torch.save(model.state_dict(), path)"
    )
    obj = _safe_load(file)
    if isinstance(obj, _StandIn):
        raise InputFileError(
            f"{file} holds a pickled {obj.global_name} object, not a state_dict; it is probably the model "
            f"itself: pass it directly, without --arch"
        )
    if isinstance(obj, nn.Module):
        raise InputFileError(
            f"{file} holds a pickled module, not a state_dict; pass it directly, without --arch"
        )
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        kind = "an empty dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise InputFileError(
            f"{file} holds {kind}, not a state_dict; save one with torch.save(model.state_dict(), path)"
        )
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            kind = (
                f"pickled {value.global_name} object" if isinstance(value, _StandIn) else type(value).__name__
            )
            raise InputFileError(
                f"{file}: entry {key!r} is a {kind}, not a tensor, so this is not a state_dict; "
                f"save one with torch.save(model.state_dict(), path), or a Lightning checkpoint with a 'state_dict'"
            )
    return {str(k): v for k, v in obj.items()}


def strip_prefix(
    state: dict[str, torch.Tensor], expected: set[str], prefix: str | None, file: Path
) -> dict[str, torch.Tensor]:
    """Keep the keys under ``prefix`` (detected when None), without it."""
    if prefix is None:
        prefix = detect_prefix(state, expected)
    elif prefix and not prefix.endswith("."):
        prefix += "."
    if not prefix:
        return state
    kept = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not kept:
        tops = sorted({k.split(".")[0] + "." for k in state if "." in k})
        raise StateDictError(
            f"--prefix {prefix!r}: no key of {file} starts with it; its keys start with "
            f"{', '.join(tops[:5]) or '(no dotted prefix)'}"
        )
    return kept


def detect_prefix(state: Mapping[str, Any], expected: set[str]) -> str:
    """The leading ``a.b.`` of the file's keys that makes the most of them match ``expected`` ('' if none)."""
    names = {_unmasked(k) for k in state}
    candidates = {""}
    for key in names:
        parts = key.split(".")
        candidates.update(".".join(parts[:i]) + "." for i in range(1, len(parts)))

    def score(p: str) -> tuple[int, int]:
        return (sum(1 for k in names if k.startswith(p) and k[len(p) :] in expected), -len(p))

    return max(sorted(candidates), key=score)


def apply_masks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``<name>_orig`` and ``<name>_mask`` -> ``<name> = orig * mask`` (what the pruning hook computes).

    ``torch.ao.pruning`` parametrizations too: ``<m>.parametrizations.<name>.original`` with its
    ``.<i>.mask`` buffers (``FakeSparsity``: the weight's shape; ``FakeStructuredSparsity``: one per row).
    """
    out: dict[str, torch.Tensor] = {}
    state = _apply_parametrizations(state)
    for key, value in state.items():
        if key.endswith(ORIG_SUFFIX) and key[: -len(ORIG_SUFFIX)] + MASK_SUFFIX in state:
            name = key[: -len(ORIG_SUFFIX)]
            mask = state[name + MASK_SUFFIX]
            if mask.shape != value.shape:
                raise StateDictError(
                    f"mask {name}{MASK_SUFFIX} has shape {tuple(mask.shape)} but {key} has {tuple(value.shape)}; "
                    f"the file is inconsistent, save the pruned model's state_dict again"
                )
            out[name] = value * mask.to(value.dtype)
        elif key.endswith(MASK_SUFFIX) and key[: -len(MASK_SUFFIX)] + ORIG_SUFFIX in state:
            continue
        else:
            out[key] = value
    return out


def check_fits(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], file: Path, arch: str
) -> None:
    """Raise one line naming missing keys, unexpected keys or the first shape that differs."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        raise StateDictError(
            f"{file} does not fit --arch {arch}: {'; '.join(parts)} keys; check that --arch builds the model "
            f"that was saved, or pass --prefix to choose the part of the checkpoint that holds it"
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise StateDictError(
                f"{file} does not fit --arch {arch}: {key} is {tuple(state[key].shape)} in the file but "
                f"{tuple(tensor.shape)} in the architecture; --arch must build the dense model the weights "
                f"come from (a compacted model is saved with -o small.safetensors and loads with compactor.load)"
            )


def _unmasked(key: str) -> str:
    for suffix in (ORIG_SUFFIX, MASK_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (", ..." if len(keys) > _SHOWN else "")


def _has_manifest(file: Path) -> bool:
    try:
        return MANIFEST_KEY in read_metadata(file)
    except InputFileError:  # not readable as safetensors: _read_safetensors says why
        return False


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise InputFileError(f"weights file {file} does not exist or is not a file; check the path")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise InputFileError(f"{file} is not a safetensors file ({first_line(e)}); check the file") from e


# --- safe loading ----------------------------------------------------------------------------------
class _StandIn(dict[Any, Any]):
    """Inert placeholder for a class the file names: keeps whatever data it is given, runs nothing.

    A dict so that pickled dict subclasses (Lightning's ``AttributeDict``) fill it; one subclass per
    global name, so that the placeholder of a top-level object still says what the object was.
    """

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _stand_in(name: str) -> type[_StandIn]:
    return type(name.rpartition(".")[2], (_StandIn,), {"global_name": name})


def _safe_load(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # names a class the safe loader does not know: read it again with stand-ins below
    except Exception as e:  # torch raises several types (RuntimeError, struct.error...) for corrupt files
        raise InputFileError(f"{file} could not be read as a PyTorch file ({type(e).__name__}: {e})") from e
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(file)
        stand_ins: list[Any] = [(_stand_in(n), n) for n in names]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or hostile archives
        raise InputFileError(
            f"{file} cannot be read safely as a state_dict ({first_line(e)}); save the weights with "
            f"torch.save(model.state_dict(), path)"
        ) from e
