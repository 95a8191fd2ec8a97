"""The start path's JSON reader agrees with the json module wherever json accepts the text."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from qemu_locked.parse import jsonlite as _json

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(values, st.booleans(), st.sampled_from([None, 2]))
def test_round_trip(value: object, ascii_only: bool, indent: int | None) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
    assert _json.loads(text) == json.loads(text)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="{}[]:,\"\\' \t\nabtrufsenl0123456789.-+eE\x01\u00e9", max_size=30))
def test_same_verdict_as_json(text: str) -> None:
    """Where json accepts a document (without duplicate keys), we read the same value."""
    try:
        expected = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, _Duplicate):
        try:
            _json.loads(text)
        except ValueError:
            pass
        return
    got = _json.loads(text)
    assert got == expected or (isinstance(got, float) and math.isnan(got))


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise _Duplicate
    return dict(pairs)


def test_qemu_extensions_and_errors() -> None:
    assert _json.loads("{'driver': 'file', 'filename': 'a\\'b'}") == {
        "driver": "file",
        "filename": "a'b",
    }
    for bad in ['{"a":1,"a":2}', '"\x01"', '"\\x"', "[1,]", "{", '"\\u12"']:
        try:
            _json.loads(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")
