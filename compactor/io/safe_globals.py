"""Judge the globals a pickled model names, from the names and the source alone, before anything runs.

``torch.load(weights_only=True)`` refuses every global it was not told about; :func:`allowed_globals` says
which of the file's globals may be told, and nothing is imported to decide it:

* a module **already imported** may be used: its object is judged as it is (:func:`is_safe`);
* the **standard library** is never imported because a file names it (``this``, ``antigravity``): only
  what is already imported of it can be used (``functools.partial``, ``collections.OrderedDict``);
* any other module (the user's own, in the working directory, or an installed package such as
  transformers) is imported only after its source, found on ``sys.path`` without executing anything (no
  ``importlib.util.find_spec``, which runs parent packages), shows that it defines that name as a class
  derived from ``torch.nn.Module``, from a Hugging Face config (``transformers``' own
  ``PretrainedConfig``/``PreTrainedConfig``/``GenerationConfig``, never another class of that name), or
  from ``enum.Enum`` (read with ``ast``, following the base classes through the files they are imported
  from);
* torch's pure tensor operators (``torch._C._nn.gelu``, which ``GELUActivation`` keeps): public builtins
  ATen defines as operators, never file, process, thread or global-state functions (``torch.load``,
  ``torch.from_file``, ``torch.fork``, ``torch.hub.load``, ``torch.jit.load``);
* anything else is refused by name.

:func:`check_calls` then reads the pickle's opcodes (:mod:`compactor.io.pickle_calls`):
``torch.save(model)`` rebuilds modules with ``__new__`` and their state, never by calling the class, so a
pickle that calls a module class (an 856-byte file that runs ``Linear(12000, 12000)``) or a torch function
is not one torch wrote; nor one that builds an enum member other than by a lookup of its one value, or
wraps anything but a module class or an operator in ``functools.partial``.
:func:`check_archive` refuses an archive whose entries expand far beyond the file (a compressed entry),
and :func:`check_tensors` a loaded tensor that reads a small storage as a huge one (a zero-stride view).
"""

from __future__ import annotations

import ast
import builtins
import enum
import functools
import inspect
import sys
import types
import zipfile
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from ..errors import InputFileError, UnsafePickleError, first_line
from .kernel_funcs import (
    FIX,
    KERNEL_REBUILD,
    kernel_call_refusal,
    kernelized_refusal,
    rebuild_kernel_func,
)
from .pickle_calls import UNKNOWN, UNKNOWN_FUNCTION, Call, calls_in

_PLAIN_CONTAINERS: tuple[type, ...] = (OrderedDict, defaultdict, dict, list, tuple, set, frozenset)
# Hugging Face configs: attribute bags a model keeps. Where the base classes are defined (4.x spells the
# base PretrainedConfig, 5.x PreTrainedConfig; generation models keep a GenerationConfig too); a class is a
# config when it derives from one of these very classes, never from another class of the same name.
_CONFIG_BASES = {
    "transformers.configuration_utils": ("PretrainedConfig", "PreTrainedConfig"),
    "transformers.generation.configuration_utils": ("GenerationConfig",),
}
_MAX_DEPTH = 12  # base classes followed across files
# Namespaces of torch's tensor operators (a model may hold one as an attribute: GELUActivation keeps
# torch._C._nn.gelu). A builtin there is an operator when ATen defines an operator of its name; Python
# functions only in torch.nn.functional.
_TORCH_OPS = (
    "torch._C._nn",
    "torch._C._VariableFunctions",
    "torch._C._special",
    "torch._C._linalg",
    "torch._C._fft",
    "torch.nn.functional",
    "torch.special",
    "torch.linalg",
    "torch.fft",
    "torch",
)
# ATen operators that are not pure arithmetic on the tensors they are given: files, threads, futures,
# uninitialised memory, unchecked sparse indices, backend kernels, random seeds, global state.
_NOT_OPERATORS = (
    "load",
    "save",
    "file",
    "seed",
    "set_",
    "hub",
    "compile",
    "jit",
    "cuda",
    "distributed",
    "ops",
    "wait",
    "fork",
    "empty",
    "unsafe",
    "sparse",
    "blob",
    "buffer",
    "print",
    "resize",
    "mkldnn",
    "miopen",
    "fbgemm",
)


# --- judging a name --------------------------------------------------------------------------------
def allowed_globals(names: list[str], file: Path) -> dict[str, Any]:
    """The object for each of ``names`` (``module.qualname``), judged safe; or one line naming what is not."""
    wrappers = sorted(q for m, q in map(_split, names) if m in _DISTRIBUTED)  # a wrapper first: its helpers
    if wrappers:  # (join configs, bucket configs) would be refused less clearly
        wrapper = next((q for q in wrappers if q.endswith("DataParallel")), wrappers[0])
        raise InputFileError(
            f"{file} holds a {wrapper} wrapper, which cannot be loaded outside its process group; save the "
            f"model inside it instead: torch.save(model.module, path)"
        )
    if KERNEL_REBUILD not in names:
        return {name: _judge(name, file) for name in names}
    allowed: dict[str, Any] = {KERNEL_REBUILD: rebuild_kernel_func}  # rebuilt from what is imported
    for name in names:
        if name != KERNEL_REBUILD:
            try:
                allowed[name] = _judge(name, file)
            except UnsafePickleError as e:  # a kernelize()d forward: code from a hub repository
                raise kernelized_refusal(file, name) from e
    return allowed


def _judge(name: str, file: Path) -> Any:
    module_name, qualname = _split(name)
    if module_name not in sys.modules or _find(sys.modules[module_name], qualname) is _MISSING:
        module_name, qualname = _split_by_source(name)  # a submodule not imported yet: where its file is
    if module_name == "__main__":
        raise InputFileError(
            f"{file} refers to {name}, a class defined in the script that saved it; move the class into a "
            f"module importable from this directory, import it there, and save the model again"
        )
    if module_name not in sys.modules:
        top = module_name.partition(".")[0]
        if top in sys.stdlib_module_names or top in sys.builtin_module_names:
            raise _unsafe(file, name, "a standard-library module the model does not need (not imported)")
        kind = _kind_in_source(module_name, qualname.split("."), 0)
        if kind is None:
            raise _unsafe(file, name, "not a module class, config or enum by its source (not imported)")
        _import(module_name, name)
    obj = _lookup(sys.modules[module_name], qualname, name, file)
    if is_safe(obj, name):
        return obj
    raise _unsafe(file, name, "not a module, pruning method, config, enum, container or torch operator")


_DISTRIBUTED = ("torch.nn.parallel.distributed", "torch.nn.parallel.data_parallel")


def _split_by_source(name: str) -> tuple[str, str]:
    """``a.b.C.D`` -> (module, qualname) for a module not imported: the longest prefix with a source file."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if _source_of(".".join(parts[:i])) is not None:
            return ".".join(parts[:i]), ".".join(parts[i:])
    module_name, _, qualname = name.rpartition(".")
    return module_name, qualname


def _split(name: str) -> tuple[str, str]:
    """``a.b.C.D`` -> (module, qualname): the longest prefix that is an imported module, else the last dot."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in sys.modules:
            return ".".join(parts[:i]), ".".join(parts[i:])
    module_name, _, qualname = name.rpartition(".")
    return module_name, qualname


def _unsafe(file: Path, name: str, why: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"{file} needs the global {name}, {why}, and could run code when loaded; pass --trust-pickle "
        f"(Python: trust_pickle=True) only if you trust the file"
    )


def _import(module_name: str, name: str) -> None:
    import importlib

    try:
        importlib.import_module(module_name)
    except Exception as e:  # the user's module, whose source was read first: its errors are theirs
        raise InputFileError(
            f"the model needs {name} but module {module_name!r} cannot be imported ({type(e).__name__}: {e}); "
            f"run from the directory that holds it or add it to PYTHONPATH"
        ) from e


def _lookup(module: types.ModuleType, qualname: str, name: str, file: Path) -> Any:
    obj = _find(module, qualname)
    if obj is _MISSING:
        raise InputFileError(
            f"the model needs {name} but module {module.__name__!r} has no {qualname!r}; is it the same code "
            f"that saved it?"
        )
    return obj


_MISSING = object()


def is_safe(obj: Any, name: str = "") -> bool:
    """A module class, pruning method, ``torch.Size``, plain container, Hugging Face config, enum,
    ``functools.partial`` (what it wraps is judged by :func:`check_calls`, its arguments' globals on their
    own), or one of torch's pure tensor operators."""
    if isinstance(obj, type):
        if issubclass(obj, (nn.Module, prune.BasePruningMethod, torch.Size, enum.Enum)):
            return True
        container = any(obj is c for c in _PLAIN_CONTAINERS)  # identity, as in _is_config
        return container or obj is functools.partial or _is_config(obj)
    return _is_torch_operator(obj, name)


def _is_config(cls: type) -> bool:
    bases = [
        vars(sys.modules[module]).get(name)
        for module, names in _CONFIG_BASES.items()
        if module in sys.modules
        for name in names
    ]
    # identity, never ==: a metaclass can make any class compare equal to transformers' own
    return any(base is known for base in cls.__mro__ for known in bases if known is not None)


def _is_torch_operator(obj: Any, name: str) -> bool:
    """One of torch's pure tensor operators, found by ``name``: a public builtin that ATen defines as an
    operator (``torch._C._nn.gelu``, ``torch.special.expit``), or a public function of torch.nn.functional."""
    module_name, _, leaf = name.rpartition(".")
    if module_name not in _TORCH_OPS or leaf.startswith("_") or _names_side_effect(leaf):
        return False
    if isinstance(obj, types.BuiltinFunctionType):
        op = getattr(obj, "__name__", "")
        return not op.startswith("_") and not _names_side_effect(op) and _is_aten_operator(op)
    return inspect.isfunction(obj) and getattr(obj, "__module__", "") == "torch.nn.functional"


def _names_side_effect(name: str) -> bool:
    return any(word in name.lower() for word in _NOT_OPERATORS)


def _is_aten_operator(name: str) -> bool:
    try:
        return bool(torch._C._jit_get_schemas_for_operator(f"aten::{name}"))
    except RuntimeError:  # not an operator name torch can parse
        return False


# --- reading source without running it -------------------------------------------------------------
def _source_of(module_name: str) -> tuple[Path, bool] | None:
    """The file defining ``module_name`` on ``sys.path`` (and whether it is a package), found by looking
    at the file system only."""
    parts = module_name.split(".")
    for entry in sys.path:
        base = Path(entry or ".")
        if not base.is_dir():
            continue
        folder = base.joinpath(*parts[:-1])
        if not folder.is_dir():
            continue
        package = folder / parts[-1] / "__init__.py"
        if package.is_file():
            return package, True
        plain = folder / f"{parts[-1]}.py"
        if plain.is_file():
            return plain, False
    return None


@functools.lru_cache(maxsize=256)
def _parsed(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None


def _kind_in_source(module_name: str, qualname: list[str], depth: int) -> str | None:
    """ "module", "config" or "enum" if ``module_name``'s source defines ``qualname`` as such a class
    (following base classes and re-exports into other files), else None."""
    if depth > _MAX_DEPTH:
        return None
    found = _source_of(module_name)
    if found is None:
        return None
    path, is_package = found
    tree = _parsed(path)
    if tree is None:
        return None
    package = module_name if is_package else module_name.rpartition(".")[0]
    scope: list[ast.stmt] = tree.body
    for i, part in enumerate(qualname):
        cls = next((n for n in scope if isinstance(n, ast.ClassDef) and n.name == part), None)
        if cls is None:
            if i == 0:  # maybe imported into this module (a package re-exporting a class)
                target = _imported(tree, part, package)
                return _kind_of_ref(target, depth + 1) if target else None
            return None
        if i == len(qualname) - 1:
            return _kind_of_class(cls, tree, module_name, package, depth)
        scope = cls.body
    return None


def _kind_of_class(
    cls: ast.ClassDef, tree: ast.Module, module_name: str, package: str, depth: int
) -> str | None:
    if cls.name in _CONFIG_BASES.get(module_name, ()):
        return "config"
    for base in cls.bases:
        dotted = _dotted(base)
        if dotted is None:
            continue
        head, _, rest = dotted.partition(".")
        local = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == head), None)
        if local is not None and not rest:
            kind = _kind_of_class(local, tree, module_name, package, depth + 1)
        else:
            target = _imported(tree, head, package)
            kind = (
                _kind_of_ref(f"{target}.{rest}" if target and rest else target, depth + 1) if target else None
            )
        if kind is not None:
            return kind
    return None


def _kind_of_ref(ref: str | None, depth: int) -> str | None:
    """The kind of a fully dotted reference (``torch.nn.Module``, ``transformers.modeling_utils.X``)."""
    if ref is None or depth > _MAX_DEPTH:
        return None
    if ref in ("enum.Enum", "enum.IntEnum", "enum.StrEnum", "enum.Flag", "enum.IntFlag"):
        return "enum"
    module_name, qualname = _split(ref)
    if module_name in sys.modules:  # torch, torch.nn, enum...: judge the real object, importing nothing
        obj = _find(sys.modules[module_name], qualname)
        if isinstance(obj, type):
            if issubclass(obj, nn.Module):
                return "module"
            if issubclass(obj, enum.Enum):
                return "enum"
            return "config" if _is_config(obj) else None
        if obj is not _MISSING:
            return None
    module_name, qualname = _split_by_source(ref)  # not imported (or not yet there): read its source
    if module_name.partition(".")[0] in sys.stdlib_module_names:
        return None
    return _kind_in_source(module_name, qualname.split("."), depth)


def _find(module: types.ModuleType, qualname: str) -> Any:
    """``module.qualname`` without a module's ``__getattr__`` (lazy modules import on it); ``_MISSING``."""
    head, _, rest = qualname.partition(".")
    obj: Any = vars(module).get(head, _MISSING)
    for part in rest.split(".") if rest else []:
        if obj is _MISSING:
            break
        obj = vars(obj).get(part, _MISSING) if isinstance(obj, type) else getattr(obj, part, _MISSING)
    return obj


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def _imported(tree: ast.Module, name: str, package: str) -> str | None:
    """What ``name`` refers to where ``tree`` imports it at top level: ``module.attr`` or ``module``."""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            for alias in node.names:
                if (alias.asname or alias.name) == name and base:
                    return f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname == name:
                    return alias.name
                if alias.asname is None and alias.name.partition(".")[0] == name:
                    return name
    return None


def _absolute(node: ast.ImportFrom, package: str) -> str | None:
    if not node.level:
        return node.module
    parts = package.split(".")
    if node.level - 1 >= len(parts):
        return None
    base = ".".join(parts[: len(parts) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


# --- what the pickle does ----------------------------------------------------------------------------
# Calls torch's default allowlist lets a pickle make that torch.save(model) never writes: an allocation of
# any size.
_NEVER_CALLED = ("builtins.bytearray", "builtins.bytes", "__builtin__.bytearray", "__builtin__.bytes")


def check_calls(file: Path, allowed: dict[str, Any]) -> list[str]:
    """Refuse a pickle that makes a call ``torch.save(model)`` never writes: a module class, a torch function,
    an allocator, an enum that runs its own code on a value, an enum built or changed other than by a lookup
    of its value, or a ``functools.partial`` of anything but a module class or a torch operator.

    Returns the transformers kernel functions (``module.function``) whose wrappers the pickle rebuilds
    (:mod:`compactor.io.kernel_funcs`), each checked to name a function of a module the file needs."""
    imported = {getattr(obj, "__module__", None) for obj in allowed.values()} - {None}
    kernels: list[str] = []
    for call in calls_in(_pickle_bytes(file)):
        if call.target == KERNEL_REBUILD and call.how == "call":
            refusal = kernel_call_refusal(call.arguments(), {str(m) for m in imported})
            if refusal is None:
                module_name, func_name = (str(v) for _, v in call.arguments() or [])
                kernels.append(f"{module_name}.{func_name}")
                continue
            what, why = refusal
            raise UnsafePickleError(
                f"{file} {what} while loading, which torch.save of a transformers model never does ({why}); "
                f"refusing to load it: {FIX}"
            )
        refusal = _refusal(call, allowed)
        if refusal is not None:
            what, why = refusal
            raise UnsafePickleError(
                f"{file} {what} while loading, which torch.save(model) never does ({why}); refusing to run it. "
                f"Re-save the model with torch.save(model, path)"
            )
    return kernels


def _refusal(call: Call, allowed: dict[str, Any]) -> tuple[str, str] | None:
    """(what the pickle does, how torch.save does it instead) for a call it never writes; else None."""
    obj = allowed.get(call.target)
    rebuilds = "it rebuilds modules from their state"
    is_enum = isinstance(obj, type) and issubclass(obj, enum.Enum)
    if call.how == "new":
        return (
            (f"calls {call.target}.__new__", "it saves an enum member as a lookup of its value")
            if is_enum
            else None
        )
    if call.how == "build":
        if is_enum:
            return f"changes a member of {call.target}", "enum members are shared; it saves one as its value"
        if obj is functools.partial:
            return _partial_refusal(call, allowed)
        return None
    if call.target in _NEVER_CALLED or call.target == UNKNOWN_FUNCTION:
        return f"calls {call.target}", rebuilds
    if obj is None:
        return None  # one of torch's own rebuild functions
    if is_enum:
        arguments = call.arguments()
        if arguments is None or len(arguments) != 1:
            return f"calls {call.target} with other than one value", "it saves an enum member as its value"
        return (
            (f"calls {call.target}", "its lookup runs the enum's own code")
            if _lookup_runs_code(obj)
            else None
        )
    if obj is functools.partial:
        return _partial_refusal(call, allowed)
    return (f"calls {call.target}", rebuilds) if _calling_runs_code(obj) else None


def _partial_refusal(call: Call, allowed: dict[str, Any]) -> tuple[str, str] | None:
    """``partial(f)`` and its state ``(f, args, kwargs, dict)``: ``f`` must be a module class or an operator
    (``partial(nn.LayerNorm, eps=1e-6)``); any global among the arguments was judged with the rest."""
    arguments = call.arguments() or []
    fn = arguments[0] if arguments else UNKNOWN
    name = str(fn[1]) if fn[0] == "global" else "an object it cannot name"
    obj = allowed.get(name)
    if (isinstance(obj, type) and issubclass(obj, nn.Module)) or _is_torch_operator(obj, name):
        return None
    return (
        f"wraps {name} in functools.partial",
        "it saves a partial of a module class or a torch operator, such as partial(nn.LayerNorm, eps=1e-6)",
    )


def _calling_runs_code(obj: Any) -> bool:
    if not isinstance(obj, type):
        return True  # a function (a torch operator): only referenced by a model, never called
    return issubclass(obj, nn.Module)


_ENUM_CLASSES = tuple(c for c in vars(enum).values() if isinstance(c, type))


def _lookup_runs_code(cls: type[enum.Enum]) -> bool:
    """``Color("red")`` only finds a member made when the class was imported, unless the class hooks it: a
    metaclass ``__call__``, a ``_missing_``, a ``__new__`` other than the lookup enum installs, or a mixin that
    is neither builtin nor an enum (a Flag's lookup calls its ``__new__``). ``str``/``int`` mixins are fine."""
    if type(cls).__call__ is not enum.EnumMeta.__call__:
        return True
    for c in cls.__mro__:
        if any(c is e for e in _ENUM_CLASSES) or c is getattr(builtins, c.__name__, None):
            continue  # identity: not __module__, which a class body sets, nor ==, which a metaclass defines
        if not issubclass(c, enum.Enum) or "_missing_" in vars(c):
            return True
        if vars(c).get("__new__", enum.Enum.__new__) is not enum.Enum.__new__:
            return True
    return False


def _pickle_bytes(file: Path) -> bytes:
    """The pickle torch will read, read by torch's own archive reader (never a decoy beside it)."""
    try:
        reader = torch._C.PyTorchFileReader(str(file))
        record: bytes = reader.get_record("data.pkl")
    except Exception as e:  # torch raises RuntimeError with its own text for malformed archives
        raise InputFileError(
            f"{file} could not be read as a PyTorch file ({first_line(e)}); re-save the model"
        ) from e
    return record


# --- sizes --------------------------------------------------------------------------------------------
_ARCHIVE_SLACK = 16 * 2**20  # bytes an archive may expand beyond 4x its size (headers, small files)


def check_archive(file: Path) -> None:
    """Refuse an archive whose entries would expand far beyond the file (compressed entries: a zip bomb);
    ``torch.save`` stores its entries uncompressed."""
    try:
        with zipfile.ZipFile(file) as archive:
            expanded = sum(i.file_size for i in archive.infolist())
    except (zipfile.BadZipFile, OSError) as e:
        raise InputFileError(f"{file} could not be read as a PyTorch file ({type(e).__name__}: {e})") from e
    size = file.stat().st_size
    if expanded > 4 * size + _ARCHIVE_SLACK:
        raise InputFileError(
            f"{file} expands to {expanded:,} bytes from {size:,} (compressed entries, which torch.save never "
            f"writes); refusing to load it. Re-save the model with torch.save(model, path)"
        )


_VIEW_SLACK = 64 * 2**20  # bytes a view may read beyond its storage before it is a bomb


def check_tensors(obj: Any, file: Path) -> None:
    """Refuse tensors that read small storages as much larger ones (expanded, zero-stride views), one or
    many: copying them (every clone compaction makes) would allocate what the file never held."""
    tensors: list[tuple[str, torch.Tensor]] = []
    if isinstance(obj, nn.Module):
        tensors = [*obj.named_parameters(remove_duplicate=False), *obj.named_buffers(remove_duplicate=False)]
        for module_name, module in obj.named_modules():
            tensors += [
                (f"{module_name}.{k}".lstrip("."), v)
                for k, v in vars(module).items()
                if isinstance(v, torch.Tensor)
            ]
    elif isinstance(obj, torch.Tensor):
        tensors = [("the tensor", obj)]
    elif isinstance(obj, (tuple, list)):
        tensors = [(f"item {i}", t) for i, t in enumerate(obj) if isinstance(t, torch.Tensor)]
    elif isinstance(obj, dict):
        tensors = [(str(k), t) for k, t in obj.items() if isinstance(t, torch.Tensor)]
    wanted = held = 0
    worst: tuple[str, torch.Tensor] | None = None
    for name, t in tensors:
        size, stored = t.numel() * t.element_size(), t.untyped_storage().nbytes()
        wanted, held = wanted + size, held + stored
        if (
            worst is None
            or size - stored
            > worst[1].numel() * worst[1].element_size() - worst[1].untyped_storage().nbytes()
        ):
            worst = (name, t)
    if worst is not None and wanted > 8 * held + _VIEW_SLACK:
        name, t = worst
        raise InputFileError(
            f"{file}: tensor {name} of shape {tuple(t.shape)} reads {t.untyped_storage().nbytes():,} stored bytes as "
            f"{t.numel() * t.element_size():,} (an expanded view; {len(tensors)} tensors read {held:,} stored bytes as "
            f"{wanted:,}), which torch.save(model) does not write for weights; refusing to copy it. Save the model "
            f"with real tensors (call .contiguous() on that one)"
        )
