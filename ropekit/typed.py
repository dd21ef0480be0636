"""One typed-value parser: text from a spec string or a ``--set key=value`` override, read as the
dataclass field's annotation says (``int``, ``float``, ``bool``, ``str``, ``dict`` as JSON, a tuple of
numbers joined by '/', any of them ``| None``). Method specs and training overrides both use it. And the
one comparison of a saved config with the dataclass it was saved from (resuming a training run or an
ablation: ``config_differences``)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

__all__ = ["parse_typed", "config_differences"]

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


def _as_json(value: Any) -> Any:
    """A setting as its saved JSON reads back (a dataclass as its fields)."""
    return json.loads(json.dumps(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value, default=str))


def config_differences(saved: dict, cfg, path: str = "") -> list[str]:
    """Where a saved config (``dataclasses.asdict`` as JSON) and the dataclass ``cfg`` differ, as
    ``key: saved -> now``. A field the saved config lacks (added to ropekit since) counts as equal
    when it holds its default; a field it has that ``cfg`` lacks (removed since) differs."""
    out = []
    names = {f.name: f for f in dataclasses.fields(cfg)}
    for key in sorted(set(saved) - set(names)):
        out.append(f"{path}{key}: {saved[key]!r} -> (no such setting now)")
    for key, f in names.items():
        now = getattr(cfg, key)
        if dataclasses.is_dataclass(now) and isinstance(saved.get(key), dict):
            out += config_differences(saved[key], now, f"{path}{key}.")
            continue
        as_json = _as_json(now)
        if key not in saved:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if default is dataclasses.MISSING or _as_json(default) != as_json:
                out.append(f"{path}{key}: (not set) -> {as_json!r}")
        elif saved[key] != as_json:
            out.append(f"{path}{key}: {saved[key]!r} -> {as_json!r}")
    return out
