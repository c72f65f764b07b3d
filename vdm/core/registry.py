"""Registries: name -> function, filled by decorators where the functions live.

    WEIGHTINGS = Registry("weighting", "model.loss_weighting")   # in vdm/model/weightings.py

    @WEIGHTINGS.register("sigmoid")
    def sigmoid(gamma, **_): ...

A registry that a params.yaml key chooses from names that key: `check_params` refuses a value no
registry entry has, one line per bad key, naming the choices. vdm/core/params.py checks only that
such a value is a name (it imports nothing above vdm/core); the stages that use a registry, and
the validate stage for all of them, call `check_params` before any work. The samplers
(vdm/sampling/steps.py), the loss weightings (vdm/model/weightings.py) and the sample metrics
(vdm/evaluation/metrics.py) are registries; a new entry is one decorated function and its test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from vdm.core.errors import ParamError, ParamErrors, UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered name -> entry map that refuses a second entry under one name."""

    def __init__(self, kind: str, param: str | None = None):
        self.kind, self.param = kind, param  # what an entry is; the params.yaml key choosing one
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator adding the function under `name`."""
        return lambda fn: self.add(name, fn)

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r}: use one of {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._entries.get(name, default)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    __setitem__ = add  # a test's temporary entry (pytest's monkeypatch.setitem), refused if taken

    def __delitem__(self, name: str) -> None:
        del self._entries[name]


def check_params(params: Any, *registries: Registry) -> None:
    """ParamErrors for every registry whose params.yaml key names no entry of it."""
    errors = []
    for reg in registries:
        if reg.param is None:
            continue
        section, key = reg.param.split(".")
        value = getattr(getattr(params, section), key)
        if value not in reg:
            errors.append(ParamError(reg.param, value, f"one of {', '.join(reg.names())}"))
    if errors:
        raise ParamErrors(errors)
