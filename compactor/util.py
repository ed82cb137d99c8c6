"""Small helpers that several stages share: on modules, and the time budget of one compaction."""

from __future__ import annotations

import contextvars
import copy
import functools
import os
import site
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch
from torch import nn

from .errors import TimeLimitError


@contextmanager
def eval_mode_restored(model: nn.Module, *, eval: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (unless ``eval=False``) and give every submodule back its own
    train/eval flag afterwards, whatever happens inside (a submodule may differ from its parent)."""
    flags = {m: m.training for m in model.modules()}
    if eval:
        model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def set_submodule(root: nn.Module, name: str, new: nn.Module | nn.Parameter) -> nn.Module:
    """Put ``new`` (a module, or a bare parameter) at dotted ``name`` in ``root``; return the root (``new``
    itself when ``name`` is '', which only a module can be)."""
    if not name:
        if not isinstance(new, nn.Module):
            raise TypeError("only a module can replace the root")
        return new
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)
    return root


# --- whose code a frame runs ---------------------------------------------------------------------------------
TORCH_DIR = (
    os.path.dirname(torch.__file__) + os.sep
)  # the separator: torchmetrics, torchvision are model code
COMPACTOR_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


# --- head counts a forward reads ----------------------------------------------------------------------------
OWN_CONFIG = "config."  # a count the forward reads from the module's config: set on a copy of its own


def get_count(module: nn.Module, attr: str) -> object:
    """The module's attribute ``attr``, or for ``"config.x"`` its config's ``x`` (None where absent)."""
    if attr.startswith(OWN_CONFIG):
        return getattr(getattr(module, "config", None), attr.removeprefix(OWN_CONFIG), None)
    return getattr(module, attr, None)


def set_count(module: nn.Module, attr: str, value: int) -> None:
    """Set what :func:`get_count` reads. A config is shared by every layer of a model (Phi-3's attention
    reads ``self.config.num_attention_heads``): the module gets a shallow copy of its own first, so the other
    layers and the model's config keep their value."""
    if not attr.startswith(OWN_CONFIG):
        setattr(module, attr, value)
        return
    if get_count(module, attr) == value:
        return
    own = copy.copy(module.config)
    setattr(own, attr.removeprefix(OWN_CONFIG), value)
    module.config = own


# --- the time budget ---------------------------------------------------------------------------------------
# A deadline every long loop checks, so that a model too large to analyse stops early with one line naming the
# part that could not be analysed instead of running for minutes (``compact(time_limit=...)``, CLI
# ``--time-limit``). It lives in a context variable set by :func:`deadline`, so the stages need no extra
# argument; :func:`check_time` raises :class:`~compactor.errors.TimeLimitError` once it has passed.

_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("compactor_deadline", default=None)


@contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Within the block, :func:`check_time` raises once ``seconds`` have passed (None: no limit)."""
    if seconds is not None and not seconds > 0:
        raise ValueError(f"time_limit must be a positive number of seconds or None, found {seconds!r}")
    token = _DEADLINE.set(None if seconds is None else (time.monotonic() + seconds, seconds))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_time(part: str) -> None:
    """Raise :class:`~compactor.errors.TimeLimitError` naming ``part`` (what was about to be analysed) if the
    deadline has passed."""
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline[0]:
        raise TimeLimitError(
            f"the time limit of {deadline[1]:g} s was reached before {part} could be analysed; nothing was "
            f"written (raise it with --time-limit SECONDS, Python: time_limit=)"
        )


_CAPTURE_MODULE = "transformers.utils.output_capturing"  # where transformers 5 defines its capturing hooks
_CAPTURE_FLAG = "_output_capturing_hooks_installed"


@contextmanager
def picklable(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` without transformers' output-capturing hooks while inside (``torch.save`` of it, say).

    transformers 5 installs them lazily, as local functions that pickle cannot store, the first time a forward
    asks for hidden states (every backbone does); with its installed flag cleared, a saved and reloaded model
    installs them again when it needs them. Everything is put back on exit."""
    hooks = {
        m: dict(m._forward_hooks) for m in model.modules() if any(map(_capturing, m._forward_hooks.values()))
    }
    flags = [m for m in model.modules() if m.__dict__.get(_CAPTURE_FLAG) is True]
    for m in hooks:
        for key in [k for k, hook in m._forward_hooks.items() if _capturing(hook)]:
            del m._forward_hooks[key]
    for m in flags:
        del m.__dict__[_CAPTURE_FLAG]
    try:
        yield model
    finally:
        for m, saved in hooks.items():
            m._forward_hooks.clear()
            m._forward_hooks.update(saved)
        for m in flags:
            m.__dict__[_CAPTURE_FLAG] = True


def _capturing(hook: object) -> bool:
    return getattr(hook, "__module__", None) == _CAPTURE_MODULE and "<locals>" in getattr(
        hook, "__qualname__", ""
    )


@functools.lru_cache(maxsize=1024)
def shown_path(filename: str) -> str:
    """``filename`` as a report shows it: an installed package's file by its import path
    (``transformers/masking_utils.py``), one under the working directory relative to it, else as it is; so that
    no report names the directories of the machine it ran on."""
    path = os.path.abspath(filename)
    roots = {*site.getsitepackages(), site.getusersitepackages(), *(p for p in sys.path if p)}
    installed = [r for r in map(os.path.abspath, roots) if "-packages" in r and path.startswith(r + os.sep)]
    if installed:
        return os.path.relpath(path, max(installed, key=len))
    cwd = os.getcwd()
    return os.path.relpath(path, cwd) if path.startswith(cwd + os.sep) else filename


T = TypeVar("T")
DEEP = 48  # module nesting beyond which work runs on a thread with a big stack (see run_deep)
_FRAMES_PER_LEVEL = 48  # Python frames one level of nesting can take (deepcopy, hooks, tracing, pickle)
_STACK_PER_LEVEL = 1 << 20  # bytes of C stack per level, generously (the C pickler and deepcopy recurse)


def module_depth(model: nn.Module) -> int:
    """How deep ``model``'s submodules nest (a leaf: 0), walked without recursion."""
    deepest, todo, seen = 0, [(model, 0)], set()
    while todo:
        module, depth = todo.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        deepest = max(deepest, depth)
        todo += [(child, depth + 1) for child in module._modules.values() if child is not None]
    return deepest


_DEEP_THREAD = "compactor-deep-model"


def run_deep(fn: Callable[[], T], depth: int) -> T:
    """``fn()``; for a model nested deeper than :data:`DEEP` (300 ``Sequential``s in one another), on a worker
    thread whose stack and the recursion limit fit that depth: ``copy.deepcopy``, ``torch.save`` and the
    model's own forward all recurse once per level. The caller's context (the time limit) goes with it."""
    if depth <= DEEP or threading.current_thread().name == _DEEP_THREAD:
        return fn()
    result: dict[str, object] = {}
    context = contextvars.copy_context()

    def target() -> None:
        try:
            result["value"] = context.run(fn)
        except BaseException as e:  # handed to the caller's thread as it is
            result["error"] = e

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 1000 + _FRAMES_PER_LEVEL * depth))
    old = threading.stack_size(min(2**31 - 2**20, 64 * 2**20 + _STACK_PER_LEVEL * depth))
    try:
        worker = threading.Thread(target=target, name=_DEEP_THREAD, daemon=True)
        worker.start()
    finally:
        threading.stack_size(old)
    try:
        worker.join()
    finally:
        sys.setrecursionlimit(limit)
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]


MMAP_THRESHOLD = 8 * 2**20  # bytes: tensors this large get pages of their own, returned when freed


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc's malloc map every allocation of ``threshold`` bytes or more on its own (``mallopt``), so
    that a freed tensor returns its memory to the system instead of staying in the heap. glibc raises the
    threshold by itself after the first large free (up to 32 MiB), after which one block's freed weights
    would stay resident while the next block is read. False where the C library is not glibc. It sets the
    whole process's allocator, as ``MALLOC_MMAP_THRESHOLD_`` would."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return False
    if mallopt is None:
        return False
    return bool(mallopt(-3, threshold))  # M_MMAP_THRESHOLD
