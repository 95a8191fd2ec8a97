"""A validator for the part of JSON Schema (draft 2020-12) that docs/*.schema.json
use, so that checking real output against them needs no new dependency.  A
keyword it does not know is an error, never silently ignored."""

from __future__ import annotations

import re
from typing import Any

_TYPES: dict[str, Any] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}  # fmt: skip
_NOTES = {"$schema", "$id", "title", "description"}
_KEYWORDS = _NOTES | {"$ref", "$defs", "type", "enum", "required", "properties",
                      "additionalProperties", "items", "pattern", "minimum"}  # fmt: skip


def _is(value: object, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False  # JSON's true is no number
    return isinstance(value, _TYPES[name])


def errors(doc: object, schema: dict[str, Any], root: dict[str, Any] | None = None,
           where: str = "$") -> list[str]:  # fmt: skip
    """Every way ``doc`` breaks ``schema``, as ``$.locks[0].mode: ...`` lines."""
    root = root or schema
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(f"{where}: keywords this validator does not know: {sorted(unknown)}")
    out: list[str] = []
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        out += errors(doc, root["$defs"][ref.removeprefix("#/$defs/")], root, where)
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is(doc, n) for n in names):
            return [*out, f"{where}: {doc!r} is not of type {names}"]
    if "enum" in schema and doc not in schema["enum"]:
        out.append(f"{where}: {doc!r} is not one of {schema['enum']}")
    if "pattern" in schema and isinstance(doc, str) and not re.search(schema["pattern"], doc):
        out.append(f"{where}: {doc!r} does not match {schema['pattern']}")
    if "minimum" in schema and _is(doc, "number") and doc < schema["minimum"]:  # type: ignore[operator]
        out.append(f"{where}: {doc!r} < {schema['minimum']}")
    if isinstance(doc, dict):
        out += [f"{where}: {k!r} missing" for k in schema.get("required", []) if k not in doc]
        props = schema.get("properties", {})
        for key, value in doc.items():
            if key in props:
                out += errors(value, props[key], root, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{where}: {key!r} is not allowed")
    if isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            out += errors(item, schema["items"], root, f"{where}[{i}]")
    return out


def check_schema(schema: dict[str, Any], where: str = "#") -> None:
    """Every subschema uses only keywords this validator knows (raises otherwise)."""
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(f"{where}: keywords this validator does not know: {sorted(unknown)}")
    for name in ("properties", "$defs"):
        for key, sub in schema.get(name, {}).items():
            check_schema(sub, f"{where}/{name}/{key}")
    if "items" in schema:
        check_schema(schema["items"], f"{where}/items")
