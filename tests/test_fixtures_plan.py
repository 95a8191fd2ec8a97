"""Every captured libvirt start in fixtures/domains/: ``qemu-lockctl plan --json``
on the argv libvirt really passed locks the right files in the right modes.

The ``NAME.plan.json`` files were written by ``qemu-lockctl plan`` itself, so
only what was then checked by hand against the argv and DESIGN.md section 4 is
compared: each disk's path and mode, and each skipped source with its reason
(issue 13 review: all 24 fixtures).  Role, origin and the header-probe flags
were never checked independently; comparing them would only detect change.
Pure: no libvirt, no disk needs to exist."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, base_env

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "domains"
NAMES = sorted(p.name.removesuffix(".argv.json") for p in FIXTURES.glob("*.argv.json"))


def test_there_are_enough_fixtures() -> None:
    assert len(NAMES) >= 20, NAMES
    for name in NAMES:
        assert (FIXTURES / f"{name}.xml").is_file()
        assert (FIXTURES / f"{name}.plan.json").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_plan_of_real_libvirt_argv(name: str) -> None:
    argv = json.loads((FIXTURES / f"{name}.argv.json").read_text())
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    expected = json.loads((FIXTURES / f"{name}.plan.json").read_text())
    proc = subprocess.run(
        [QEMU_LOCKCTL, "plan", "--json", "--", *argv],
        capture_output=True,
        text=True,
        env=base_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert checked(json.loads(proc.stdout)) == checked(expected)


def checked(plan: dict[str, list[dict[str, str]]]) -> dict[str, list[tuple[str, str]]]:
    return {
        "disks": [(d["path"], d["mode"]) for d in plan["disks"]],
        "skipped": [(s["source"], s["reason"]) for s in plan["skipped"]],
    }
