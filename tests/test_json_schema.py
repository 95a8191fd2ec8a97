"""`status`, `plan` and `check --json` are stable for scripts: their real output,
in every row form this machine can produce, matches docs/*.schema.json (issue 23).
Validated by tests/schema_check.py (the subset of draft 2020-12 the schemas use)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, base_env, make_image
from schema_check import check_schema, errors

DOCS = Path(__file__).resolve().parent.parent / "docs"
DATA = Path(__file__).resolve().parent / "data"


def schema(name: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((DOCS / f"{name}.schema.json").read_text())
    return loaded


def out(*argv: str, env: dict[str, str] | None = None, codes: tuple[int, ...] = (0,)) -> object:
    r = subprocess.run([QEMU_LOCKCTL, *argv], env=env or base_env(), capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode in codes, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("name", ["status", "plan", "check"])
def test_the_schemas_are_draft_2020_12_in_the_checked_subset(name: str) -> None:
    loaded = schema(name)
    assert loaded["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    check_schema(loaded)  # type: ignore[arg-type]


def test_the_validator_finds_what_breaks_a_schema() -> None:
    """A validator that cannot fail proves nothing."""
    s = schema("status")
    row = {"path": "/x", "mode": "exclusive", "pid": 1, "host": "h", "guest": None,
           "uuid": None, "since": "2026-01-01T00:00:00Z"}  # fmt: skip
    assert errors({"locks": [row], "unlisted": []}, s) == []  # type: ignore[arg-type]
    bad = [
        {"locks": [row]},  # unlisted missing
        {"locks": [{**row, "pid": "1"}], "unlisted": []},
        {"locks": [{**row, "pid": True}], "unlisted": []},
        {"locks": [{**row, "mode": "writing"}], "unlisted": []},
        {"locks": [{**row, "since": "yesterday"}], "unlisted": []},
        {"locks": [{**row, "extra": 1}], "unlisted": []},
        {"locks": [{k: v for k, v in row.items() if k != "host"}], "unlisted": []},
        {"locks": [], "unlisted": [{"device": "8:2", "inode": -1, "mode": "shared"}]},
    ]
    for doc in bad:
        assert errors(doc, s), doc  # type: ignore[arg-type]


HOLD = (
    "import os,sys,time; from qemu_locked.lock import ofd; "
    "fd=os.open(sys.argv[1], os.O_RDWR); assert ofd.try_lock(fd, True); "
    "print('held', flush=True); time.sleep(120)"
)


@pytest.fixture
def held(tmp_path: Path) -> Iterator[str]:
    img = make_image(tmp_path / "held.img")
    p = subprocess.Popen([sys.executable, "-c", HOLD, img], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "held\n"
    yield img
    p.kill()
    p.wait()


def test_status_output_matches_its_schema(start, tmp_path: Path, held: str) -> None:  # type: ignore[no-untyped-def]
    s = schema("status")
    space = tmp_path / "lockspace"
    space.mkdir()
    env = base_env(QEMU_LOCKED_BACKEND="lockspace", QEMU_LOCKED_LOCKSPACE_DIR=str(space),
                   QEMU_LOCKED_HOST_NAME="hostA")  # fmt: skip
    live = make_image(tmp_path / "live.img")
    vm = start("-name", "guest=schema", "-uuid", "00000000-0000-4000-8000-0000000000aa",
               "-drive", f"file={live}", env=env)  # fmt: skip
    assert vm.started()
    gone = make_image(tmp_path / "gone.img")
    dead = start("-name", "guest=dead", "-drive", f"file={gone}", env=env)
    assert dead.started()
    dead.kill()
    docs = {
        "everything here": out("status", "--json", env=env),
        "held, lease record": out("status", "--json", live, env=env),
        "stale record": out("status", "--json", gone, env=env),
        "a local holder": out("status", "--json", held),
    }
    pidns = ["unshare", "--pid", "--fork", "--mount-proc", QEMU_LOCKCTL, "status", "--json"]
    if os.geteuid() == 0:
        for name, argv in (("elsewhere", [*pidns, held]), ("unlisted", pidns)):
            r = subprocess.run(argv, env=base_env(), capture_output=True, text=True, timeout=60)
            docs[name] = json.loads(r.stdout)
    states = {row.get("state") for d in docs.values() for row in d["locks"]}  # type: ignore[index]
    assert {"held", "stale"} <= states, states
    if os.geteuid() == 0:
        assert "elsewhere" in states and docs["unlisted"]["unlisted"], docs  # type: ignore[index]
    for name, doc in docs.items():
        assert errors(doc, s) == [], (name, doc)  # type: ignore[arg-type]


def test_plan_and_check_output_match_their_schemas(held: str) -> None:
    plan = out("plan", "--json", "--domain", str(DATA / "lab1.xml"))
    assert errors(plan, schema("plan")) == []  # type: ignore[arg-type]
    argv = ["-drive", f"file={held}", "-drive", "file=nbd://nbd.example:10809/export"]
    refused = out("check", "--json", "--", *argv, codes=(1,))
    assert refused["conflicts"] and refused["skipped"]  # type: ignore[index]
    assert errors(refused, schema("check")) == []  # type: ignore[arg-type]
    free = out("check", "--json", "--", "-drive", f"file={make_image(Path(held).parent / 'f.img')}")
    assert free["ok"] is True  # type: ignore[index]
    assert errors(free, schema("check")) == []  # type: ignore[arg-type]
