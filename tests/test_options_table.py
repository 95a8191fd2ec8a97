"""The option table (parse/options.py) against QEMU's own sources and a real binary.

tests/data/qemu-options/ holds every DEF() of qemu-options.hx for the releases read from
Debian source packages, plus the removals QEMU documents; the merge below must give the
table exactly, columns and all.  The installed QEMU (7.2 here) is then asked about
every option of the table, the way the wrapper asks about an unknown one (start.probe).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from qemu_locked.parse import options
from qemu_locked.start import probe

DATA = Path(__file__).parent / "data" / "qemu-options"
SAMPLES = ("5.2", "7.2", "10.0", "10.2")
NEWEST = SAMPLES[-1]
QEMU = shutil.which("qemu-system-x86_64")


def rows(name: str) -> list[list[str]]:
    text = (DATA / name).read_text(encoding="utf-8")
    return [ln.split("\t") for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def release_before(v: str) -> str:
    major, minor = (int(x) for x in v.split("."))
    if minor:
        return f"{major}.{minor - 1}"
    # the last minor of each major series (QEMU's own release history)
    return {3: "2.12", 4: "3.1", 5: "4.2", 6: "5.2", 7: "6.2", 8: "7.2", 9: "8.2", 10: "9.2"}[major]


def merged() -> dict[str, tuple[bool, str, str]]:
    seen: dict[str, list[str]] = {}
    arity: dict[str, str] = {}
    for v in SAMPLES:
        for name, a, *_rest in rows(f"{v}.txt") + [r + ["", ""] for r in rows("vl-c.txt")]:
            assert arity.setdefault(name, a) == a, f"-{name} changed arity in {v}"
            if v not in seen.setdefault(name, []):
                seen[name].append(v)
    removed = dict(rows("removed-in-10.2.txt"))
    table: dict[str, tuple[bool, str, str]] = {}
    for name, vs in seen.items():
        last = "" if vs[-1] == NEWEST else vs[-1]
        if name in removed:
            last = release_before(removed[name])
        table[name] = (arity[name] == "arg", "<=" + vs[0], last)
    for name, a in rows("pre-5.2.txt"):
        assert name not in table
        table[name] = (
            a == "arg",
            "<2.12",
            release_before(removed[name]) if name in removed else "<5.2",
        )
    return table


def test_table_is_exactly_what_the_sources_say() -> None:
    got = {name: (takes, first, last) for name, takes, first, last in options.OPTIONS}
    assert len(got) == len(options.OPTIONS), "an option is listed twice"
    assert got == merged()


def test_every_release_file_names_its_source() -> None:
    for f in DATA.glob("*.txt"):
        assert "source" in f.read_text().split("\n# name")[0], f


def test_forms_of_issue_14() -> None:
    assert {"run-with", "shim", "realtime", "tftp", "hdachs", "writeconfig"} <= options.ARG_OPTIONS
    assert {"async-teardown", "no-user-config", "snapshot", "daemonize"} <= options.NO_ARG_OPTIONS
    assert not options.ARG_OPTIONS & options.NO_ARG_OPTIONS


@pytest.fixture(scope="module")
def qemu() -> str:
    if QEMU is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("CI: qemu-system-x86_64 must be installed (make test installs it)")
        pytest.skip("qemu-system-x86_64 not installed")
    return QEMU


def test_real_qemu_agrees_with_the_table(qemu: str) -> None:
    """QEMU 7.2's first pass: the options of 7.2.txt take a value exactly as the table
    says; the table's options it lacks (later or earlier releases) are unknown to it."""
    version = probe_version(qemu)
    known = {r[0] for r in rows(f"{version}.txt")} | {"h"}
    wrong = []
    for name, takes, _first, _last in options.OPTIONS:
        want = (probe.TAKES_VALUE if takes else probe.NO_VALUE) if name in known else probe.UNKNOWN
        got = probe.ask(qemu, name)
        if got != want:
            wrong.append((name, want, got))
    assert wrong == []


def probe_version(qemu: str) -> str:
    import subprocess

    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=True).stdout
    words = out.split()
    full = words[words.index("version") + 1]
    v = ".".join(full.split(".")[:2])
    if v not in SAMPLES:
        pytest.fail(f"installed QEMU {full} is not a sampled release {SAMPLES}")
    return v


def test_libvirt_never_makes_the_wrapper_ask_the_binary() -> None:
    """Every option in every captured libvirt start (9.0 and 11.3) is in the table, so
    a libvirt start never pays for a probe."""
    import json

    fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "domains"
    known = options.ARG_OPTIONS | options.NO_ARG_OPTIONS
    argvs = sorted(fixtures.glob("*.argv.json"))
    assert any(p.name.startswith("lv11_") for p in argvs)
    for path in argvs:
        argv = json.loads(path.read_text())
        i = 0
        while i < len(argv):
            name = argv[i].lstrip("-")
            if argv[i].startswith("-"):
                assert name in known, (path.name, argv[i])
                i += 2 if name in options.ARG_OPTIONS else 1
            else:
                i += 1
