"""What a pickle will call, read from its opcodes without running it.

A small simulation of the unpickler's stack follows the globals each opcode hands on: ``REDUCE`` calls
``f(*args)``, ``NEWOBJ`` calls ``cls.__new__(cls, *args)``, and ``BUILD`` hands a state to whatever a call
returned (``partial.__setstate__`` replaces the function a ``functools.partial`` wraps). Each becomes a
:class:`Call`; :func:`compactor.io.safe_globals.check_calls` judges them. What the simulation cannot follow
is an unknown item, never a guess.
"""

from __future__ import annotations

import pickletools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

Item = tuple[str, Any]  # ("global", "mod.name"), ("str", s), ("tuple", [items]), ("made", Call) or UNKNOWN
UNKNOWN: Item = ("?", None)  # a stack item the simulation does not follow
UNKNOWN_FUNCTION = "an unknown function"

# _rebuild_from_type_v2(func, type, args, state) calls func(*args): torch allows it by default.
_TRAMPOLINES = ("torch._tensor._rebuild_from_type_v2", "torch._tensor._rebuild_from_type")
_STRINGS = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING")
_TUPLE_SIZES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "EMPTY_TUPLE": 0}


@dataclass(frozen=True)
class Call:
    """One call the unpickler makes.

    ``how``: ``"call"`` (``target(*args)``), ``"new"`` (``target.__new__(target, *args)``) or ``"build"``
    (``args`` is the state handed to an object ``target`` returned). ``target`` is a global's dotted name or
    :data:`UNKNOWN_FUNCTION`; ``args`` the argument tuple (or state) as the simulation saw it."""

    how: str
    target: str
    args: Item = UNKNOWN

    def arguments(self) -> list[Item] | None:
        """The positional arguments when the simulation followed them, else None."""
        kind, value = self.args
        return list(value) if kind == "tuple" else None


def calls_in(data: bytes) -> Iterator[Call]:
    """Every call the pickle ``data`` makes, in order; nothing for a malformed pickle (torch refuses it)."""
    try:
        ops = list(pickletools.genops(data))
    except Exception:  # a malformed pickle: torch refuses it with its own message
        return
    machine = _Stack()
    for op, arg, _ in ops:
        yield from machine.step(op, arg)


class _Stack:
    def __init__(self) -> None:
        self.items: list[Item] = []
        self.marks: list[int] = []
        self.memo: dict[Any, Item] = {}

    def pop(self) -> Item:
        return self.items.pop() if self.items else UNKNOWN

    def until_mark(self) -> list[Item]:
        start = self.marks.pop() if self.marks else 0
        taken = self.items[start:]
        del self.items[start:]
        return taken

    def step(self, op: pickletools.OpcodeInfo, arg: Any) -> Iterator[Call]:
        name = op.name
        if name == "GLOBAL":
            self.items.append(("global", str(arg).replace(" ", ".")))
        elif name == "STACK_GLOBAL":
            qual, mod = self.pop(), self.pop()
            both = mod[0] == qual[0] == "str"
            self.items.append(("global", f"{mod[1]}.{qual[1]}") if both else UNKNOWN)
        elif name in _STRINGS:
            self.items.append(("str", arg))
        elif name == "MARK":
            self.marks.append(len(self.items))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[arg] = self.items[-1] if self.items else UNKNOWN
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.items[-1] if self.items else UNKNOWN
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            self.items.append(self.memo.get(arg, UNKNOWN))
        elif name in _TUPLE_SIZES or name == "TUPLE":
            count = _TUPLE_SIZES.get(name)
            if count is None:
                items = self.until_mark()
            else:
                items = self.items[len(self.items) - count :] if count else []
                del self.items[len(self.items) - count :]
            self.items.append(("tuple", items))
        else:
            yield from self._calls(name, arg, op)

    def _calls(self, name: str, arg: Any, op: pickletools.OpcodeInfo) -> Iterator[Call]:
        if name == "REDUCE":
            args, fn = self.pop(), self.pop()
            yield from self._made(Call("call", _target(fn), args))
            if fn[0] == "global" and fn[1] in _TRAMPOLINES:
                inner = args[1][0] if args[0] == "tuple" and args[1] else UNKNOWN
                if inner[0] != "global" or not str(inner[1]).startswith("torch._utils._rebuild"):
                    yield Call("call", _target(inner))
        elif name in ("NEWOBJ", "NEWOBJ_EX"):
            if name == "NEWOBJ_EX":
                self.pop()  # keyword arguments
            args, cls = self.pop(), self.pop()
            yield from self._made(Call("new", _target(cls), args))
        elif name in ("OBJ", "INST"):
            items = self.until_mark()
            if name == "INST":
                target = str(arg).replace(" ", ".")
                yield from self._made(Call("call", target, ("tuple", items)))
            else:
                cls = items[0] if items else UNKNOWN
                yield from self._made(Call("call", _target(cls), ("tuple", items[1:])))
        elif name == "BUILD":
            state = self.pop()
            made = self.items[-1] if self.items else UNKNOWN
            if made[0] == "made":
                yield Call("build", made[1].target, state)
        else:
            _generic(op, self.items, self.marks)

    def _made(self, call: Call) -> Iterator[Call]:
        yield call
        self.items.append(("made", call))


def _target(item: Item) -> str:
    return str(item[1]) if item[0] == "global" else UNKNOWN_FUNCTION


def _generic(op: pickletools.OpcodeInfo, stack: list[Item], marks: list[int]) -> None:
    before = op.stack_before
    if pickletools.markobject in before:
        start = marks.pop() if marks else 0
        del stack[start:]
        del stack[len(stack) - before.index(pickletools.markobject) :]
    elif before:
        del stack[len(stack) - len(before) :]
    stack.extend(UNKNOWN for item in op.stack_after if item is not pickletools.markobject)
