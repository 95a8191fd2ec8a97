"""Frozen value classes without importing :mod:`dataclasses`.

``import dataclasses`` costs 17-27 ms on this machine kind (it pulls in ``re``
and ``inspect``), more than the whole interpreter start, and the emulator
start path builds value objects.  This decorator gives the part of frozen
dataclasses we use (keyword/positional ``__init__`` with defaults, equality,
hashing, ``repr``, ``replace``) and tells type checkers so through
``dataclass_transform``.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    from typing_extensions import dataclass_transform

    _T = TypeVar("_T")
else:

    def dataclass_transform(**_kw: object) -> object:
        return lambda f: f


_MISSING = object()


def _fields(cls: type) -> tuple[tuple[str, object], ...]:
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        for name in klass.__dict__.get("__annotations__", {}):
            if name not in names and not name.startswith("_"):
                names.append(name)
    return tuple((n, getattr(cls, n, _MISSING)) for n in names)


def _init(self: Any, *args: object, **kwargs: object) -> None:
    fields = type(self)._fields_
    if not kwargs and len(args) == len(fields):  # the common, hot case
        self.__dict__.update(zip(type(self)._names_, args, strict=True))
        return
    if len(args) > len(fields):
        raise TypeError(f"{type(self).__name__}() takes {len(fields)} arguments")
    for (name, _default), value in zip(fields, args, strict=False):
        if name in kwargs:
            raise TypeError(f"{type(self).__name__}() got {name!r} twice")
        kwargs[name] = value
    for name, default in fields:
        value = kwargs.pop(name, default)
        if value is _MISSING:
            raise TypeError(f"{type(self).__name__}() missing {name!r}")
        object.__setattr__(self, name, value)
    if kwargs:
        raise TypeError(f"{type(self).__name__}() got unexpected {sorted(kwargs)}")


def _setattr(self: object, name: str, value: object) -> None:
    raise AttributeError(f"{type(self).__name__} is frozen")


def _key(self: Any) -> tuple[object, ...]:
    return tuple(getattr(self, n) for n, _ in type(self)._fields_)


def _eq(self: object, other: object) -> object:
    if type(other) is not type(self):
        return NotImplemented
    return bool(_key(self) == _key(other))


def _hash(self: object) -> int:
    return hash((type(self).__name__,) + _key(self))


def _repr(self: Any) -> str:
    inner = ", ".join(f"{n}={getattr(self, n)!r}" for n, _ in type(self)._fields_)
    return f"{type(self).__name__}({inner})"


@dataclass_transform(frozen_default=True)
def frozen(cls: type[_T]) -> type[_T]:
    """Make ``cls`` an immutable value class from its annotated fields."""
    cls._fields_ = _fields(cls)  # type: ignore[attr-defined]
    cls._names_ = tuple(n for n, _ in cls._fields_)  # type: ignore[attr-defined]
    for name, fn in (
        ("__init__", _init),
        ("__setattr__", _setattr),
        ("__delattr__", _setattr),
        ("__eq__", _eq),
        ("__hash__", _hash),
        ("__repr__", _repr),
    ):
        setattr(cls, name, fn)
    return cls


def replace(obj: _T, **changes: object) -> _T:
    """A copy of ``obj`` with some fields changed (like ``dataclasses.replace``)."""
    values = {n: getattr(obj, n) for n, _ in type(obj)._fields_}  # type: ignore[attr-defined]
    values.update(changes)
    return type(obj)(**values)


def asdict(obj: object) -> dict[str, object]:
    return {n: getattr(obj, n) for n, _ in type(obj)._fields_}  # type: ignore[attr-defined]
