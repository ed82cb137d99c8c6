"""Judge the globals a pickled model names, from the names and the source alone, before anything runs.

``torch.load(weights_only=True)`` refuses every global it was not told about; :func:`allowed_globals` says
which of the file's globals may be told, and nothing is imported to decide it:

* a module **already imported** may be used: its object is judged as it is (:func:`is_safe`);
* the **standard library** is never imported because a file names it (``this``, ``antigravity``): only
  what is already imported of it can be used (``functools.partial``, ``collections.OrderedDict``);
* any other module (the user's own, in the working directory, or an installed package such as
  transformers) is imported only after its source, found on ``sys.path`` without executing anything (no
  ``importlib.util.find_spec``, which runs parent packages), shows that it defines that name as a class
  derived from ``torch.nn.Module``, from a Hugging Face config, or from ``enum.Enum`` (read with ``ast``,
  following the base classes through the files they are imported from);
* anything else is refused by name.

:func:`check_calls` then reads the pickle's opcodes: ``torch.save(model)`` rebuilds modules with
``__new__`` and their state, never by calling the class, so a pickle that calls a module class (an
856-byte file that runs ``Linear(12000, 12000)``) or a torch function is not one torch wrote.
:func:`check_archive` refuses an archive whose entries expand far beyond the file (a compressed entry),
and :func:`check_tensors` a loaded tensor that reads a small storage as a huge one (a zero-stride view).
"""

from __future__ import annotations

import ast
import enum
import functools
import inspect
import pickletools
import sys
import types
import zipfile
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from ..errors import InputFileError, UnsafePickleError, first_line

_PLAIN_CONTAINERS: tuple[type, ...] = (OrderedDict, defaultdict, dict, list, tuple, set, frozenset)
# Hugging Face configs: attribute bags a model keeps (4.x and 5.x spell the base differently; generation
# models keep a GenerationConfig too).
_CONFIG_BASES = ("PretrainedConfig", "PreTrainedConfig", "GenerationConfig")
_MAX_DEPTH = 12  # base classes followed across files
# Namespaces of torch's pure tensor operators (a model may hold one as an attribute: GELUActivation keeps
# torch._C._nn.gelu); never torch.load/save, file, process, global-state or compilation functions.
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
    return {name: _judge(name, file) for name in names}


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
    ``functools.partial`` (its function and arguments are globals judged on their own), or one of torch's
    pure tensor operators."""
    if isinstance(obj, type):
        if issubclass(obj, (nn.Module, prune.BasePruningMethod, torch.Size, enum.Enum)):
            return True
        return obj in _PLAIN_CONTAINERS or obj is functools.partial or _is_config(obj)
    return _is_torch_operator(obj, name)


def _is_config(cls: type) -> bool:
    return any(
        base.__name__ in _CONFIG_BASES and base.__module__.startswith("transformers.") for base in cls.__mro__
    )


def _is_torch_operator(obj: Any, name: str) -> bool:
    module_name = name.rpartition(".")[0]
    leaf = name.rpartition(".")[2]
    if module_name not in _TORCH_OPS or any(word in leaf.lower() for word in _NOT_OPERATORS):
        return False
    if isinstance(obj, types.BuiltinFunctionType):
        return True
    return inspect.isfunction(obj) and getattr(obj, "__module__", "") == "torch.nn.functional"


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
            return _kind_of_class(cls, tree, package, depth)
        scope = cls.body
    return None


def _kind_of_class(cls: ast.ClassDef, tree: ast.Module, package: str, depth: int) -> str | None:
    if cls.name in _CONFIG_BASES and package.startswith("transformers"):
        return "config"
    for base in cls.bases:
        dotted = _dotted(base)
        if dotted is None:
            continue
        head, _, rest = dotted.partition(".")
        local = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == head), None)
        if local is not None and not rest:
            kind = _kind_of_class(local, tree, package, depth + 1)
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
# any size, and the tensor-subclass rebuilder, which calls whatever function it is handed.
_NEVER_CALLED = ("builtins.bytearray", "builtins.bytes", "__builtin__.bytearray", "__builtin__.bytes")
_TRAMPOLINES = ("torch._tensor._rebuild_from_type_v2", "torch._tensor._rebuild_from_type")


def check_calls(file: Path, allowed: dict[str, Any]) -> None:
    """Refuse a pickle that calls a module class, a torch function, an allocator, or an enum that runs its
    own code on a value (``torch.save`` writes none of these)."""
    for called in _called_globals(_pickle_bytes(file)):
        obj = allowed.get(called)
        if (
            called in _NEVER_CALLED
            or called == "an unknown function"
            or (obj is not None and _calling_runs_code(obj))
        ):
            raise UnsafePickleError(
                f"{file} calls {called} while loading, which torch.save(model) never does (it rebuilds modules "
                f"from their state); refusing to run it. Re-save the model with torch.save(model, path)"
            )


def _calling_runs_code(obj: Any) -> bool:
    if not isinstance(obj, type):
        return True  # a function (a torch operator): only referenced by a model, never called
    if issubclass(obj, nn.Module):
        return True
    if issubclass(obj, enum.Enum):  # Color("red") is a lookup, unless the enum hooks it
        return any(
            "_missing_" in vars(c) or "__new__" in vars(c)
            for c in obj.__mro__
            if not c.__module__.startswith("enum")
        )
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


_UNKNOWN: tuple[str, Any] = ("?", None)  # a stack item the simulation does not follow


def _called_globals(data: bytes) -> Iterator[str]:
    """The globals each REDUCE / OBJ / INST opcode calls, by a small simulation of the pickle stack."""
    stack: list[tuple[str, Any]] = []
    marks: list[int] = []
    memo: dict[Any, tuple[str, Any]] = {}
    try:
        ops = list(pickletools.genops(data))
    except Exception:  # a malformed pickle: torch refuses it with its own message
        return
    for op, arg, _ in ops:
        name = op.name
        if name == "GLOBAL":
            stack.append(("global", str(arg).replace(" ", ".")))
        elif name == "STACK_GLOBAL":
            qual, mod = stack.pop(), stack.pop()
            stack.append(("global", f"{mod[1]}.{qual[1]}") if mod[0] == qual[0] == "str" else _UNKNOWN)
        elif name in (
            "SHORT_BINUNICODE",
            "BINUNICODE",
            "BINUNICODE8",
            "UNICODE",
            "SHORT_BINSTRING",
            "BINSTRING",
        ):
            stack.append(("str", arg))
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1] if stack else _UNKNOWN
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else _UNKNOWN
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, _UNKNOWN))
        elif name == "REDUCE":
            args = stack.pop() if stack else _UNKNOWN
            fn = stack.pop() if stack else _UNKNOWN
            if fn[0] == "global":
                yield fn[1]
                if fn[1] in _TRAMPOLINES:  # _rebuild_from_type_v2(func, type, args, state) calls func(*args)
                    inner = args[1][0] if args[0] == "tuple" and args[1] else _UNKNOWN
                    if inner[0] != "global" or not inner[1].startswith("torch._utils._rebuild"):
                        yield str(inner[1]) if inner[0] == "global" else "an unknown function"
            stack.append(_UNKNOWN)
        elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
            count = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "EMPTY_TUPLE": 0}.get(name)
            start = (marks.pop() if marks else 0) if count is None else len(stack) - count
            items = stack[start:]
            del stack[start:]
            stack.append(("tuple", items))
        elif name in ("OBJ", "INST"):
            start = marks.pop() if marks else 0
            items = stack[start:]
            del stack[start:]
            if name == "INST":
                yield str(arg).replace(" ", ".")
            elif items and items[0][0] == "global":
                yield items[0][1]
            stack.append(_UNKNOWN)
        else:
            _generic(op, stack, marks)


def _generic(op: Any, stack: list[tuple[str, Any]], marks: list[int]) -> None:
    before = op.stack_before
    if pickletools.markobject in before:
        start = marks.pop() if marks else 0
        del stack[start:]
        del stack[len(stack) - before.index(pickletools.markobject) :]
    elif before:
        del stack[len(stack) - len(before) :]
    stack.extend(_UNKNOWN for item in op.stack_after if item is not pickletools.markobject)


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
