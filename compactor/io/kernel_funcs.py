"""transformers' hub-kernel wrappers in a pickled model, rebuilt from installed code without running the file.

With the ``kernels`` package installed, transformers decorates functions such as Llama's
``apply_rotary_pos_emb`` with ``use_kernel_forward_from_hub``: the module-level name then holds an instance of
a small ``nn.Module`` class made from the function (``Func``), and every attention module built keeps its own
instance in ``module._kernel_funcs``. ``torch.save(model)`` writes each as a call
``kernels._internals.layer.layer._rebuild_kernel_func(module_name, func_name)`` and a state
``(module.__dict__, forward_func)``. Unpickled, that function imports ``module_name`` and returns
``type(getattr(module, func_name))()``: it fetches nothing from the hub and runs no code of the file's, but it
imports a module the file names, which :mod:`compactor.io.safe_globals` never lets a file do.

So the safe loader answers that call with :func:`rebuild_kernel_func`, which does the same from what is
already imported (the module whose classes the file needs, judged and imported beforehand), and checks its
arguments before the load (:func:`kernel_call_refusal`). Two cases:

* ``kernels`` is installed here too: the module-level name is a ``Func`` instance; a new instance of its class
  is what the file's own function would have returned.
* it is not: transformers' decorator was a no-op, the name is the plain function, and the attention module
  does not read ``_kernel_funcs``: a :class:`UnusedKernelFunc` stands in, and :func:`reconcile_kernel_funcs`
  removes them after the load, so the model is what transformers builds here.

The other way round (saved without ``kernels``, loaded with it), the attention modules lack the wrappers
their decorated forward reads: :func:`reconcile_kernel_funcs` adds them as the decorator's ``__init__`` would.

A model whose wrappers were ``kernelize()``d holds a forward function loaded from a hub repository: that is
code the file would have to import, and it is refused in one line (:func:`kernelized_refusal`).
"""

from __future__ import annotations

import inspect
import pickle
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UnsafePickleError

KERNEL_REBUILD = "kernels._internals.layer.layer._rebuild_kernel_func"
FIX = (
    "pass --trust-pickle (Python: trust_pickle=True) only if you trust the file, or save the model with "
    "model.save_pretrained(dir) and give the directory"
)


class UnusedKernelFunc(nn.Module):
    """What a kernel wrapper becomes where ``kernels`` is not installed: transformers' plain function is
    called by name there, never through the wrapper. Removed after the load."""

    def __init__(self, function: Any = None) -> None:
        super().__init__()
        self.function = function

    def __setstate__(self, state: Any) -> None:  # (module.__dict__, forward_func): nothing to restore
        nn.Module.__init__(self)
        self.function = None


def kernel_function(module_name: str, func_name: str) -> Any:
    """The module-level object ``func_name`` of the imported module ``module_name``, if it is a kernel
    wrapper (``Func`` instance) or a plain function defined there; else None."""
    module = sys.modules.get(module_name)
    if module is None or module_name.partition(".")[0] == "compactor":
        return None
    obj = vars(module).get(func_name)
    if isinstance(obj, nn.Module) and _is_kernels_wrapper(type(obj)):
        return obj
    if inspect.isfunction(obj) and obj.__module__ == module_name:
        return obj  # kept as a reference only: never called (UnusedKernelFunc)
    return None


def _is_kernels_wrapper(cls: type) -> bool:
    """A class ``kernels`` made from a function (``_create_func_module``): its constructor is
    ``nn.Module``'s and its state is restored by kernels' own ``__setstate__``, so building one runs no other
    code."""
    setstate = vars(cls).get("__setstate__")
    return (
        getattr(cls, "__init__", None) is nn.Module.__init__
        and getattr(setstate, "__module__", None) == _KERNELS_LAYER
        and getattr(setstate, "__qualname__", "") == "_create_func_module.<locals>.Func.__setstate__"
    )


_KERNELS_LAYER = KERNEL_REBUILD.rpartition(".")[0]


def rebuild_kernel_func(module_name: str, func_name: str) -> nn.Module:
    """``_rebuild_kernel_func`` without its import: a new wrapper of the already imported function."""
    obj = kernel_function(module_name, func_name)
    if obj is None:
        raise pickle.UnpicklingError(
            f"{module_name}.{func_name} is not a kernel function of an imported module"
        )
    if isinstance(obj, nn.Module):
        wrapper: nn.Module = type(obj)()
        return wrapper
    return UnusedKernelFunc(obj)


def kernel_classes(names: list[str]) -> list[Any]:
    """What the unpickler must be told about to restore the wrappers' state: the wrapper classes of the
    given ``module.function`` names (already judged) and the stand-in."""
    classes: list[Any] = [UnusedKernelFunc]
    for name in names:
        module_name, _, func_name = name.rpartition(".")
        obj = kernel_function(module_name, func_name)
        if isinstance(obj, nn.Module):
            classes.append(type(obj))
    return classes


def kernel_call_refusal(
    arguments: list[tuple[str, Any]] | None, imported: set[str]
) -> tuple[str, str] | None:
    """Why a call of ``_rebuild_kernel_func`` with these arguments (as the pickle simulation saw them) is not
    one ``torch.save`` of a transformers model writes; None where it is. ``imported``: the modules of the
    globals the file was allowed, the only ones it may name."""
    if arguments is None or len(arguments) != 2 or any(kind != "str" for kind, _ in arguments):
        return (
            "calls the kernels rebuild function with other than two names",
            "it names a module and a function",
        )
    module_name, func_name = (str(value) for _, value in arguments)
    if module_name not in imported or kernel_function(module_name, func_name) is None:
        return (
            f"rebuilds a kernel function {module_name}.{func_name}",
            "it names a function of a model module the file also needs",
        )
    return None


def kernelized_refusal(file: Path, name: str) -> UnsafePickleError:
    """The one line for a model whose kernel wrappers hold a forward loaded from a hub repository."""
    return UnsafePickleError(
        f"{file} holds a transformers model with hub kernels attached (kernels' _rebuild_kernel_func, and "
        f"{name}, a function it would import); refusing to load it: {FIX}"
    )


def reconcile_kernel_funcs(model: nn.Module) -> tuple[int, int]:
    """Make the loaded model's wrappers what transformers' installed code expects; return (dropped, added).

    Dropped: ``_kernel_funcs`` that hold stand-ins (saved with ``kernels``, loaded without). Added: the
    wrappers a module class decorated with ``use_kernelized_func`` reads in its forward, where the file was
    saved without ``kernels`` (its modules have none): built as the decorator's ``__init__`` builds them."""
    dropped = added = 0
    for module in model.modules():
        funcs = vars(module).get("_kernel_funcs")
        if isinstance(funcs, dict) and funcs and all(isinstance(f, UnusedKernelFunc) for f in funcs.values()):
            del module._kernel_funcs
            dropped += 1
        elif funcs is None:
            wrapped = _kernelized_functions(type(module))
            if wrapped:
                module.__dict__["_kernel_funcs"] = {name: type(fn)() for name, fn in wrapped.items()}
                added += 1
    return dropped, added


def _kernelized_functions(cls: type) -> dict[str, nn.Module]:
    """The wrappers ``kernels.use_kernelized_func`` gives each instance of ``cls``, by name; {} if undecorated."""
    init = vars(cls).get("__init__")
    code = getattr(init, "__code__", None)
    if (
        code is None
        or getattr(init, "__module__", None) != _KERNELS_LAYER
        or getattr(init, "__qualname__", "") != "use_kernelized_func.<locals>.decorator.<locals>.new_init"
    ):
        return {}
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in getattr(init, "__closure__", None) or ())))
    found: dict[str, nn.Module] = {}
    for fn in cells.get("decorator_args", ()):
        name = getattr(fn, "__name__", None) or getattr(fn, "kernel_layer_name", None)
        if isinstance(fn, nn.Module) and _is_kernels_wrapper(type(fn)) and isinstance(name, str):
            found[name] = fn
    return found
