"""Hostile input beyond the parser tables: -readconfig from FIFOs and loops,
lease records and names that try to steer qemu-locked."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from conftest import QEMU_LOCKED, base_env, make_image, run
from hypothesis import given, settings
from hypothesis import strategies as st
from stress.support import record

from qemu_locked.backends.lockspace import leases


def test_readconfig_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "cfg.fifo"
    os.mkfifo(fifo)
    r = run([QEMU_LOCKED, "-readconfig", str(fifo)])
    assert (
        r.returncode == 1 and r.stderr == f"qemu-locked: -readconfig: {fifo}: not a regular file\n"
    )


def test_readconfig_self_and_many(tmp_path: Path) -> None:
    cfg = tmp_path / "loop.cfg"
    cfg.write_text('[drive]\n  file = "/nonexistent/x.img"\n')
    r = run([QEMU_LOCKED] + ["-readconfig", str(cfg)] * 20)
    assert r.returncode == 1 and "more than 16 -readconfig files" in r.stderr


def test_planted_hardlink_is_refused(tmp_path: Path) -> None:
    space = tmp_path / "ls"
    space.mkdir()
    img = make_image(tmp_path / "i.img")
    victim = tmp_path / "victim"
    victim.write_bytes(b"x" * 100)
    os.link(victim, space / leases.lease_name("file:" + os.path.realpath(img)))
    r = run([QEMU_LOCKED, "-drive", f"file={img}"],
            env=base_env(QEMU_LOCKED_BACKEND="lockspace", QEMU_LOCKED_LOCKSPACE_DIR=str(space)))  # fmt: skip
    assert r.returncode == 5 and "not a plain lease file" in r.stderr
    assert victim.read_bytes() == b"x" * 100


def test_planted_files_with_other_names_are_ignored(tmp_path: Path) -> None:
    space = tmp_path / "ls"
    space.mkdir()
    (space / "evil.lease").symlink_to("/etc/passwd")
    img = make_image(tmp_path / "i.img")
    r = run([QEMU_LOCKED, "-drive", f"file={img}"],
            env=base_env(QEMU_LOCKED_BACKEND="lockspace", QEMU_LOCKED_LOCKSPACE_DIR=str(space), FAKE_QEMU_EXIT="0"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(space)) == sorted(
        ["evil.lease", leases.lease_name("file:" + os.path.realpath(img))]
    )


counter = {"n": 0}
lock = threading.Lock()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=leases.RECORD_SIZE + 10))
def test_records_parse_safely(raw: bytes) -> None:
    with lock:
        counter["n"] += 1
    rec = leases.decode_record(1, raw)
    assert rec is None or isinstance(rec.pid, int)
    rec = leases.decode_record(1, b"qemu-locked-record 1\n" + raw)
    assert rec is None or len(rec.host) <= leases.RECORD_SIZE


def test_records_are_size_limited() -> None:
    data = leases.encode_record(
        {"host": "h" * 5000, "guest": "g\nmode=exclusive", "pid": "1", "since": "1"}
    )
    assert len(data) == leases.RECORD_SIZE
    rec = leases.decode_record(1, data)
    assert rec is not None
    assert (
        rec.guest == "g mode=exclusive" and rec.mode == ""
    )  # no field injection through a newline
    assert len(rec.host) == 200
    record("records", "random bytes and oversized/injected fields parsed as lease records", counter["n"] + 1,
           "never crashed, never trusted a malformed record")  # fmt: skip


def test_argv_fuzz_at_scale() -> None:
    """The parser's property test, run long: any argv gives a plan or one error line."""
    from hypothesis import HealthCheck
    from stress.support import scale
    from test_qemu_args import token

    from qemu_locked.model.errors import QemuLockedError
    from qemu_locked.parse.argv import parse_argv

    seen = {"n": 0, "errors": 0}

    @settings(
        max_examples=scale(300, 20000), deadline=None, suppress_health_check=list(HealthCheck)
    )
    @given(st.lists(token, max_size=16))
    def run_one(argv: list[str]) -> None:
        seen["n"] += 1
        try:
            parse_argv(argv, read_config=lambda p: "[drive]\n")
        except QemuLockedError as exc:
            seen["errors"] += 1
            assert len(exc.lines()) == 1

    run_one()
    record("argv-fuzz", "generated QEMU command lines (options, JSON, escapes, fdsets, missing values)", seen["n"],
           f"no crash; {seen['errors']} refused with one line (exit 2), the rest planned")  # fmt: skip
