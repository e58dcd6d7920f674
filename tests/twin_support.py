"""``twin_mismatches``: how a blocking twin class differs from its async original.

Every public method and property of the async class must exist on the twin with the same parameters
(names, kinds, defaults, annotations) and the same return annotation, read as the twin sees it: a
coroutine's result is returned directly, an async generator/iterator becomes ``Iterator[...]``, and
``__aenter__``/``__aexit__`` become ``__enter__``/``__exit__``. Annotations are compared as written
(both modules use postponed annotations), so a twin names its own twin classes (``MicroVM``,
``Files``) exactly as the async side names the async ones. Twin methods must be plain functions:
no coroutine or async generator may reach sync code.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

_ASYNC_ITER = re.compile(r"^(?:AsyncGenerator\[(.+), None\]|AsyncIterator\[(.+)\])$")
_CONTEXT = {"__aenter__": "__enter__", "__aexit__": "__exit__"}


def public_members(cls: type) -> dict[str, Any]:
    """The public methods and properties of ``cls`` (inherited ones included), plus its context
    manager methods."""
    members = {}
    for name in dir(cls):
        if name.startswith("_") and name not in {*_CONTEXT, *_CONTEXT.values()}:
            continue
        value = inspect.getattr_static(cls, name)
        if isinstance(value, property) or inspect.isfunction(value):
            members[name] = value
    return members


def _as_sync(annotation: Any) -> Any:
    if isinstance(annotation, str):
        m = _ASYNC_ITER.match(annotation)
        if m:
            return f"Iterator[{m.group(1) or m.group(2)}]"
    return annotation


def _params(fn: Any) -> list[tuple[str, Any, Any, Any]]:
    return [(p.name, p.kind, p.default, p.annotation) for p in inspect.signature(fn).parameters.values()]


def twin_mismatches(async_cls: type, sync_cls: type, *, exempt: Mapping[str, str] = {}) -> list[str]:
    """Each way ``sync_cls`` is not a complete, typed blocking twin of ``async_cls`` (empty: none).

    ``exempt`` maps async member names left out on purpose to the reason (documentation only).
    """
    problems = []
    twins = public_members(sync_cls)
    for name, original in sorted(public_members(async_cls).items()):
        if name in exempt:
            continue
        twin_name = _CONTEXT.get(name, name)
        twin = twins.get(twin_name)
        where = f"{sync_cls.__name__}.{twin_name}"
        if twin is None:
            problems.append(f"{where} is missing")
            continue
        if isinstance(original, property):
            if not isinstance(twin, property):
                problems.append(f"{where} must be a property")
            elif original.fget and twin.fget:
                want = _as_sync(inspect.signature(original.fget).return_annotation)
                got = inspect.signature(twin.fget).return_annotation
                if want != got:
                    problems.append(f"{where} returns {got!r}, the async side {want!r}")
            continue
        if not inspect.isfunction(twin):
            problems.append(f"{where} must be a method")
            continue
        if inspect.iscoroutinefunction(twin) or inspect.isasyncgenfunction(twin):
            problems.append(f"{where} is async: a blocking twin must return plain values")
        if name in _CONTEXT:
            continue  # __enter__ returns the twin; __exit__ takes the same three arguments
        if _params(original) != _params(twin):
            problems.append(f"{where} parameters {_params(twin)} differ from the async {_params(original)}")
        want = _as_sync(inspect.signature(original).return_annotation)
        got = inspect.signature(twin).return_annotation
        if want != got:
            problems.append(f"{where} returns {got!r}, the async side {want!r}")
    return problems
