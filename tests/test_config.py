"""Config: the fast flat-TOML reader agrees with tomllib, and values are validated."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qemu_locked.model import config
from qemu_locked.model.errors import ConfigError

key = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
scalar = st.one_of(
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x7f"), max_size=20),
)


def toml_value(v: object) -> st.SearchStrategy[str]:
    if isinstance(v, bool):
        return st.just("true" if v else "false")
    if isinstance(v, int):
        return st.just(str(v))
    s = str(v)
    basic = (
        '"'
        + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        + '"'
    )
    basic = "".join(c if ord(c) >= 0x20 or c == "\t" else f"\\u{ord(c):04x}" for c in basic)
    options = [basic]
    if "'" not in s and "\n" not in s and all(ord(c) >= 0x20 or c == "\t" for c in s):
        options.append("'" + s + "'")
    return st.sampled_from(options)


@st.composite
def documents(draw: st.DrawFn) -> str:
    keys = draw(st.lists(key, unique=True, max_size=6))
    lines = []
    for k in keys:
        v = draw(scalar)
        comment = draw(st.sampled_from(["", "  # note", "\n# a comment line"]))
        lines.append(f"{k} = {draw(toml_value(v))}{comment}")
    return "\n".join(lines) + "\n"


@settings(max_examples=300, deadline=None)
@given(documents())
def test_fast_reader_agrees_with_tomllib(doc: str) -> None:
    try:
        fast = config._parse_simple(doc)
    except config._NotSimple:
        return  # tomllib handles it; the point is never to disagree
    assert fast == tomllib.loads(doc)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_text_is_a_value_or_one_config_error(doc: str) -> None:
    try:
        values = config.parse_toml(doc, "x.toml")
    except ConfigError as exc:
        assert len(exc.lines()) == 1
        return
    assert isinstance(values, dict)


def test_defaults_and_env(tmp_path) -> None:
    cfg = config.load({})  # no file at the default path on test machines is fine too
    assert cfg.backend == "direct" and cfg.domain_lease and cfg.wait == 0.0
    f = tmp_path / "c.toml"
    f.write_text('backend = "lockspace"\nwait = 2.5\nreadonly = "none"\n')
    cfg = config.load({"QEMU_LOCKED_CONFIG": str(f), "QEMU_LOCKED_DOMAIN_LEASE": "0"})
    assert (cfg.backend, cfg.wait, cfg.readonly, cfg.domain_lease, cfg.source) == (
        "lockspace",
        2.5,
        "none",
        False,
        str(f),
    )


def test_missing_explicit_config_is_an_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.load({"QEMU_LOCKED_CONFIG": str(tmp_path / "absent.toml")})


def test_shipped_example_config_is_the_defaults(tmp_path) -> None:
    from pathlib import Path

    example = Path(config.__file__).parents[1] / "examples" / "qemu-locked.toml"
    cfg = config.load({"QEMU_LOCKED_CONFIG": str(example)})
    from qemu_locked.model.value import replace

    assert replace(cfg, source="(defaults)") == config.Config()
