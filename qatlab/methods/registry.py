"""Method registry: a dict plus a decorator that fails loudly on duplicates."""

from __future__ import annotations

import inspect
from typing import Any

from qatlab.errors import QatlabError

METHODS: dict[str, type] = {}


def register_method(name: str):
    """Class decorator: make a QuantMethod subclass buildable as `method=<name>`."""

    def add(cls: type) -> type:
        if name in METHODS:
            raise RuntimeError(f"method '{name}' is registered twice ({METHODS[name]} and {cls})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def build_method(name: str, **options: Any):
    """Instantiate a registered method by name, with its options checked against its signature."""
    if name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise QatlabError(f"unknown method '{name}'; choose one of: {known} (method=<name>)")
    cls = METHODS[name]
    accepted = _accepted_options(cls)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise QatlabError(
            f"method '{name}' has no option(s) {unknown}; its options are: {sorted(accepted)}"
        )
    return cls(**options)


def _accepted_options(cls: type) -> set[str]:
    """Keyword names of cls.__init__, and of its bases' __init__ where **kwargs passes them on."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())
        names |= {p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names
