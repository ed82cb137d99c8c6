"""Hugging Face directories: ``config.json`` + ``model.safetensors`` that ``from_pretrained`` loads.

When every layer of a kind ends with the same width (the same FFN width in every block), the config can
state it: :func:`uniform_config` finds the config fields (``intermediate_size`` and whatever the
architecture needs) that make a model built from the config have exactly the compacted shapes, by
building it on the meta device (no memory, no weights). The directory then loads with
``AutoModel*.from_pretrained(dir)`` and no compactor installed.

Otherwise (widths that differ across layers, heads a config cannot express, a bias a fold added) the
directory holds the dense config and the compacted weights with compactor's shape manifest, and
``compactor.load(dir)`` rebuilds it. ``compact --uniform`` makes the first possible for any mask.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputFileError, OutputPathError, UnsafeCodeError, first_line
from ..inputs import ExampleInputs
from ..outputs import Outputs, compare
from .atomic import umask
from .safetensors import MANIFEST_KEY, read_metadata, write_safetensors

WEIGHTS = "model.safetensors"
STREAMED_MANIFEST = "compactor_manifest.json"  # the layer shapes of a streamed compaction's output
_MAX_TRIES = 64  # config candidates built on the meta device


def is_hf_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (judged by its classes, without importing transformers)."""
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
        for c in type(model).__mro__
    )


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def uniform_config(model: nn.Module) -> tuple[Any | None, str]:
    """A copy of ``model.config`` whose model has exactly ``model``'s tensor shapes, and which fields it
    changed; or None and why no config can state them."""
    config: Any = getattr(model, "config")  # noqa: B009  (a transformers model: typed as a plain module here)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    dense = _shapes(model, config)
    if dense == target:
        return copy.deepcopy(config), "no width changed"
    if set(dense) != set(target):
        extra = sorted(set(target) - set(dense))[:2]
        return (
            None,
            f"the compacted model has tensors the architecture does not build ({', '.join(extra)}: a folded constant's bias)",
        )
    changed = [(k, i, d, t) for k in target for i, (d, t) in enumerate(zip(dense[k], target[k])) if d != t]
    sizes = {d for _, _, d, _ in changed}
    fields = {
        name: sorted({t for _, _, d, t in changed if d == value})
        for name, value in config.to_dict().items()
        if isinstance(value, int) and not isinstance(value, bool) and value in sizes and hasattr(config, name)
    }
    if len(fields) > 1:  # fields that share a dense value: keep those that shape a changed tensor
        governing = {n: o for n, o in fields.items() if _governs(model, config, n, dense, changed)}
        fields = governing or fields
    fields = {**_head_fields(model, config), **fields}  # an uneven head count is what to name first
    if any(len(options) > 1 for options in fields.values()):
        uneven = next(n for n, o in fields.items() if len(o) > 1)
        return (
            None,
            f"{uneven} differs across layers ({', '.join(map(str, fields[uneven]))}); --uniform evens it out",
        )
    names = list(fields)
    refused = ""
    for count in range(1, len(names) + 1):
        for chosen in itertools.islice(itertools.combinations(names, count), _MAX_TRIES):
            stated = ", ".join(f"{n}={fields[n][0]}" for n in chosen)
            candidate = copy.deepcopy(config)
            try:  # a config class may validate its fields (LlamaConfig: hidden_size % num_attention_heads)
                for name in chosen:
                    setattr(candidate, name, fields[name][0])
                getattr(candidate, "validate", lambda: None)()  # what save_pretrained checks
                if _shapes(model, candidate) == target:
                    return candidate, stated
            except Exception as e:  # the config or the model refuses these values
                refused = (
                    refused or f"; {type(config).__name__} refuses {stated}: {first_line(e.__cause__ or e)}"
                )
    return (
        None,
        "no config field states the compacted widths (attention heads of this layout, for one)" + refused,
    )


def _head_fields(model: nn.Module, config: Any) -> dict[str, list[int]]:
    """Head counts as config fields: the query and key/value heads that grouped-query attention modules
    (``q_proj``/``k_proj`` of ``head_dim`` rows per head, ``num_key_value_groups``) hold, where they changed."""
    heads: dict[str, set[int]] = {"num_attention_heads": set(), "num_key_value_heads": set()}
    for module in model.modules():
        q, k, hd = (getattr(module, a, None) for a in ("q_proj", "k_proj", "head_dim"))
        if not (isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(hd, int) and hd > 0):
            continue
        if isinstance(getattr(module, "num_key_value_groups", None), int):
            heads["num_attention_heads"].add(q.out_features // hd)
            heads["num_key_value_heads"].add(k.out_features // hd)
    return {
        name: sorted(found)
        for name, found in heads.items()
        if found and isinstance(getattr(config, name, None), int) and found != {getattr(config, name)}
    }


def _governs(
    model: nn.Module,
    config: Any,
    name: str,
    dense: dict[str, tuple[int, ...]],
    changed: list[tuple[str, int, int, int]],
) -> bool:
    """Whether config field ``name`` shapes one of the ``changed`` tensor dimensions: the model built with it
    doubled differs there (True where the config refuses the probe: it cannot be ruled out)."""
    probe = copy.deepcopy(config)
    try:
        setattr(probe, name, 2 * getattr(config, name))
        shapes = _shapes(model, probe)
    except Exception:  # the config or the model refuses the doubled value
        return True
    return any(shapes.get(key, ())[i : i + 1] != dense[key][i : i + 1] for key, i, _, _ in changed)


def _shapes(model: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        built = type(model)(config)
    return {k: tuple(v.shape) for k, v in built.state_dict().items()}


def write_hf(
    model: nn.Module, folder: Path, runs: list[ExampleInputs], references: list[Outputs]
) -> dict[str, Any]:
    """Write ``model`` as a Hugging Face directory at ``folder`` (a temporary one, renamed into place once
    it reloads and reproduces ``references``). Returns what was written and how to load it."""
    if not is_hf_model(model):
        raise OutputPathError(
            f"-o {folder}: a Hugging Face directory needs a transformers model (PreTrainedModel), not "
            f"{type(model).__name__}; give a file name such as {folder.with_suffix('.pt')}"
        )
    config, why = uniform_config(model)
    tmp = temporary_dir(folder)
    try:
        info = _write_uniform(model, config, tmp, runs, references) if config is not None else None
        if info is None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            info = _write_manifest(model, tmp, runs, references, why)
        else:
            info["fields"] = why
        move_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info["bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return info


def _write_uniform(
    model: nn.Module, config: Any, tmp: Path, runs: list[ExampleInputs], references: list[Outputs]
) -> dict[str, Any] | None:
    """``save_pretrained`` with the config that states the widths; None when ``from_pretrained`` does not
    give the outputs back (then the manifest layout is written instead)."""
    import transformers

    from ..modules import clone_module

    clone: Any = clone_module(model)
    clone.config = config
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated; a mismatch is found below
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated; no progress bars on a CLI's stderr
    try:
        clone.save_pretrained(str(tmp), safe_serialization=True)
        reloaded = clone.from_pretrained(str(tmp), trust_remote_code=False).eval()
    except Exception:  # transformers raises many types; the manifest layout still works
        return None
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated
    if not compare(reloaded, runs, references, 0.0).ok:
        return None
    auto = _auto_class(model)
    return {"layout": "config", "load": f"transformers.{auto}.from_pretrained(dir)"}


def _write_manifest(
    model: nn.Module, tmp: Path, runs: list[ExampleInputs], references: list[Outputs], why: str
) -> dict[str, Any]:
    """The dense config and the compacted weights with compactor's shape manifest."""
    config: Any = copy.deepcopy(getattr(model, "config"))  # noqa: B009
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(tmp))
    write_safetensors(model, tmp / WEIGHTS, runs, references, lambda: build_model(tmp))
    return {"layout": "manifest", "why": why, "load": "compactor.load(dir)"}


def _auto_class(model: nn.Module) -> str:
    """The ``AutoModel*`` class that maps this config to this model class, or the class itself."""
    import transformers

    for name in dir(transformers):
        if not name.startswith("AutoModel"):
            continue
        mapping = getattr(getattr(transformers, name), "_model_mapping", None)
        try:
            if mapping is not None and mapping[type(model.config)] is type(model):
                return name
        except (KeyError, ValueError, AttributeError):
            continue
    return type(model).__name__


def temporary_dir(folder: Path) -> Path:
    import tempfile

    parent = folder.parent if str(folder.parent) else Path(".")
    return Path(
        tempfile.mkdtemp(prefix=f".{folder.name}.compactor-{os.getpid()}-", suffix=".tmp", dir=parent)
    )


def move_into_place(tmp: Path, folder: Path) -> None:
    """Rename the finished temporary folder into place, with the usual modes (mkdtemp makes it 0700)."""
    mask = umask()
    tmp.chmod(0o777 & ~mask)
    for file in tmp.iterdir():
        file.chmod(0o666 & ~mask)
    if folder.exists():
        if not folder.is_dir() or any(folder.iterdir()):
            raise OutputPathError(f"-o {folder} exists and is not an empty directory; choose a new directory")
        folder.rmdir()
    os.replace(tmp, folder)


# --- loading -------------------------------------------------------------------------------------------
def load_hf(folder: Path, *, trust_remote_code: bool = False) -> nn.Module:
    """A directory ``write_hf`` wrote (or any Hugging Face model directory), in the mode it loads in.

    The model class comes from ``config.json``'s ``architectures``, a class transformers itself defines. A
    config with ``auto_map`` (model code in the directory) is refused unless ``trust_remote_code``: then
    transformers imports that code. transformers is always told which (``trust_remote_code=``), so it never
    asks on standard input."""
    config = checked_config(folder, trust_remote_code)
    if (folder / STREAMED_MANIFEST).is_file():
        return load_streamed(folder, trust_remote_code)
    weights = folder / WEIGHTS
    if weights.is_file() and MANIFEST_KEY in read_metadata(weights):
        from .safetensors import load_safetensors

        return load_safetensors(weights, lambda: build_model(folder, trust_remote_code))
    cls = _model_class(folder, config, trust_remote_code)
    try:
        model: nn.Module = cls.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types
        raise InputFileError(
            f"{folder} could not be loaded with {cls.__name__}.from_pretrained ({first_line(e)})"
        ) from e
    return model


def checked_config(folder: Path, trust_remote_code: bool) -> dict[str, Any]:
    """``config.json``, refused in one line where it names code of the directory (``auto_map``) and the
    caller did not say they trust it."""
    config = read_config(folder)
    if config.get("auto_map") is not None and not trust_remote_code:
        raise UnsafeCodeError(
            f"{folder}/config.json has auto_map ({_auto_map_names(config)}): the model's code is in the directory, "
            f"and loading it would run that code; refusing: pass trust_remote_code=True (CLI: --trust-remote-code) "
            f"only if you trust the directory"
        )
    return config


def load_streamed(folder: Path, trust_remote_code: bool = False) -> nn.Module:
    """A directory a streamed compaction wrote: the config's model built on the meta device, each layer
    resized to the manifest (``compactor_manifest.json``), then every tensor loaded from the shards; the dense
    model is never materialised."""
    from .checkpoint import Checkpoint
    from .safetensors import fit_to_manifest
    from .skeleton import aliases, fill, tensor_names

    where = str(folder / STREAMED_MANIFEST)
    spec = _json_object(folder / STREAMED_MANIFEST)
    checkpoint = Checkpoint.open(folder)
    stored = {name: checkpoint.shape(name) for name in checkpoint.names}
    model = fit_to_manifest(build_skeleton(folder, trust_remote_code), spec, where, stored)
    fill(model, tensor_names(model, ""), checkpoint, aliases(model))
    return model


def build_skeleton(folder: Path, trust_remote_code: bool = False) -> nn.Module:
    """The dense model of ``folder``'s config, parameters on the meta device, in eval mode."""
    from .skeleton import parameters_on_meta

    with parameters_on_meta():
        model = build_model(folder, trust_remote_code)
    return model.eval()


def build_model(folder: Path, trust_remote_code: bool = False) -> nn.Module:
    """The dense model of ``folder``'s config, randomly initialised (its weights are loaded next)."""
    import transformers

    cls = _model_class(folder, read_config(folder), trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        model: nn.Module = cls(config)
    except (
        Exception
    ) as e:  # an unknown model_type, a config its class rejects: transformers raises many types
        raise InputFileError(
            f"{folder}/config.json does not build {cls.__name__} ({first_line(e, with_type=True)}); write the "
            f"directory again with save_pretrained"
        ) from e
    return model


def read_config(folder: Path) -> dict[str, Any]:
    return _json_object(folder / "config.json")


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a file of the directory, or one line saying why it is not one."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(f"{path} is not readable JSON ({e}); write the directory again") from e
    if not isinstance(value, dict):
        raise InputFileError(f"{path} is not a JSON object; write the directory again")
    return value


def _auto_map_names(config: dict[str, Any]) -> str:
    auto_map = config["auto_map"]
    if isinstance(auto_map, dict):
        return ", ".join(f"{k}: {v}" for k, v in list(auto_map.items())[:3])
    return repr(auto_map)[:120]


def _model_class(folder: Path, config: dict[str, Any], trust_remote_code: bool) -> Any:
    """The class named by ``architectures``: transformers' own, or where trusted, the ``auto_map`` entry
    that names it (transformers imports it from the directory)."""
    import transformers

    names = config.get("architectures") or []
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    cls = getattr(transformers, name, None) if name else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    auto_map = config.get("auto_map")
    if trust_remote_code and name and isinstance(auto_map, dict):
        for auto, target in auto_map.items():
            if isinstance(target, str) and target.rpartition(".")[2] == name and auto.startswith("AutoModel"):
                return getattr(transformers, auto)
    raise InputFileError(
        f"{folder}/config.json names no transformers model class ('architectures': {names!r}); load it with "
        f"the class that wrote it"
    )


__all__ = [
    "STREAMED_MANIFEST",
    "WEIGHTS",
    "build_model",
    "checked_config",
    "is_hf_dir",
    "is_hf_model",
    "load_hf",
    "load_streamed",
    "move_into_place",
    "read_config",
    "temporary_dir",
    "uniform_config",
    "write_hf",
]
