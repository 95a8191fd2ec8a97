"""Options no table knows: their arity is asked of the binary to be exec'd, and cached.

The real QEMU's answers for every option are checked in test_options_table.py; here a
stand-in binary answers like QEMU's first pass and counts how often it is asked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, QEMU_LOCKED, base_env

from qemu_locked.start import probe

# Answers as QEMU's first pass does for -OPT -zz-a -zz-b; -new-arg takes a value,
# -new-flag none, anything else is unknown.  Every call is counted in $COUNT_FILE.
STAND_IN = """#!{python}
import os, sys
with open(os.environ["COUNT_FILE"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
opt = sys.argv[1]
if sys.argv[2:] != ["-zz-a", "-zz-b"]:
    sys.exit(0)
bad = {{"-new-arg": "-zz-b", "-new-flag": "-zz-a", "-mute": None}}.get(opt, opt)
if bad:
    sys.stderr.write(f"qemu-system-x86_64: {{bad}}: invalid option\\n")
sys.exit(1)
"""


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    exe = tmp_path / "qemu-system-x86_64"
    exe.write_text(STAND_IN.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("COUNT_FILE", str(tmp_path / "calls"))
    (tmp_path / "calls").write_text("")
    return exe


def calls(exe: Path) -> list[str]:
    return (exe.parent / "calls").read_text().splitlines()


def test_answers_and_the_cache(stand_in: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    p = probe.Prober(str(stand_in), str(cache))
    assert (p("new-arg"), p("new-flag"), p("nope")) == ("arg", "none", "unknown")
    assert len(calls(stand_in)) == 3
    (cached,) = cache.iterdir()
    lines = cached.read_text().splitlines()
    st = stand_in.stat()
    assert lines[0].split("\t")[1:] == [str(stand_in), str(st.st_size), str(st.st_mtime_ns),
                                        str(st.st_ctime_ns)]  # fmt: skip
    # a second wrapper run: answered from the file, the binary is not run again
    again = probe.Prober(str(stand_in), str(cache))
    assert again("new-arg") == "arg" and again("nope") == "unknown"
    assert len(calls(stand_in)) == 3
    # a changed binary (an upgrade): asked again
    os.utime(stand_in, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert probe.Prober(str(stand_in), str(cache))("new-arg") == "arg"
    assert len(calls(stand_in)) == 4


def test_odd_option_names_are_unknown_never_run_never_cached(
    stand_in: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    p = probe.Prober(str(stand_in), str(cache))
    assert p("new-arg") == "arg"
    assert p("x\tnone\nnew-arg") == "unknown"
    assert p("foo: -zz-b") == "unknown"
    assert len(calls(stand_in)) == 1
    (cached,) = cache.iterdir()
    assert cached.read_text().splitlines()[1:] == ["new-arg\targ"]


def test_cache_that_cannot_be_written_is_no_error(stand_in: Path, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    p = probe.Prober(str(stand_in), str(not_a_dir / "cache"))
    assert p("new-flag") == "none"
    assert probe.Prober(str(stand_in), str(not_a_dir / "cache"))("new-flag") == "none"
    assert len(calls(stand_in)) == 2  # asked each time


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert probe.cache_dir("") == f"{tmp_path}/qemu-locked"
    assert probe.cache_dir("/var/cache/x") == "/var/cache/x"


def test_unknown_option_value_is_not_an_image(stand_in: Path, tmp_path: Path) -> None:
    env = base_env(QEMU_LOCKED_EMULATOR=str(stand_in), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    args = ["-new-arg", "v.img", "-new-flag", "w.img", "-drive", "file=a.img,format=raw"]
    p = subprocess.run([QEMU_LOCKCTL, "plan", "--json", "--", *args], capture_output=True,
                       text=True, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr
    # -new-arg took v.img; -new-flag took nothing, so w.img is a positional image
    assert sorted(d["path"] for d in json.loads(p.stdout)["disks"]) == ["a.img", "w.img"]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("-nope", "qemu-locked: -nope: invalid option (the QEMU binary does not know it)\n"),
        ("-mute", "cannot tell whether it takes a value"),
    ],
)
def test_unknown_and_unlearnable_options_are_refused_in_one_line(
    stand_in: Path, tmp_path: Path, option: str, message: str
) -> None:
    env = base_env(QEMU_LOCKED_EMULATOR=str(stand_in), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    r = subprocess.run([QEMU_LOCKED, option, "x.img"], capture_output=True, text=True, env=env)
    assert r.returncode == 1
    assert r.stderr.startswith("qemu-locked: -") and r.stderr.count("\n") == 1
    assert message in r.stderr
    assert all(c.endswith("-zz-a -zz-b") for c in calls(stand_in))  # only asked, never run
