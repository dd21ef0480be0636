"""One typed-value parser: text from a spec string or a ``--set key=value`` override, read as the
dataclass field's annotation says (``int``, ``float``, ``bool``, ``str``, ``dict`` as JSON, a tuple of
numbers joined by '/', any of them ``| None``). Method specs and training overrides both use it."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["parse_typed"]

_WHAT = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "text",
    "dict": "a JSON object",
    "tuple": "numbers joined by '/' (e.g. 1/1.5/2)",
    "None": "none",
}


def _kinds(annotation: str) -> list[str]:
    """'float | None' -> ['float', 'None']; 'tuple[float, ...]' -> ['tuple']."""
    return [a.strip().split("[")[0] for a in str(annotation).split("|")]


def _one(text: str, kind: str) -> Any:
    low = text.strip().lower()
    if kind == "None":
        if low in ("none", "null", ""):
            return None
        raise ValueError
    if kind == "bool":
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError
    if kind == "int":
        number = float(text)
        if not number.is_integer():
            raise ValueError
        return int(number)
    if kind == "float":
        return float(text)
    if kind == "str":
        return text
    if kind == "dict":
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError
        return value
    if kind == "tuple":
        return tuple(float(t.strip()) for t in text.split("/"))
    raise ValueError


def parse_typed(text: str, annotation: str) -> Any:
    """The value ``text`` stands for under ``annotation``; ValueError saying what is accepted otherwise."""
    kinds = _kinds(annotation)
    for kind in kinds:  # None first when allowed, so 'none' never reads as the text 'none'
        if kind != "None":
            continue
        try:
            return _one(text, "None")
        except ValueError:
            pass
    for kind in kinds:
        if kind == "None":
            continue
        try:
            return _one(text, kind)
        except ValueError:
            continue
    raise ValueError("expected " + " or ".join(_WHAT.get(k, k) for k in kinds))
