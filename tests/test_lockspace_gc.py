"""`qemu-lockctl lockspace gc`: lease files nobody holds go, held ones stay, and a
collector racing acquirers never lets two of them hold one lease."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import QEMU_LOCKCTL, QEMU_LOCKED, base_env, make_image, run

from qemu_locked.backends.lockspace import gc, leases
from qemu_locked.model.claim import Claim


def env_for(lockspace: str, **extra: str) -> dict[str, str]:
    return base_env(QEMU_LOCKED_BACKEND="lockspace", QEMU_LOCKED_LOCKSPACE_DIR=lockspace, **extra)


def lease_files(lockspace: Path) -> list[str]:
    return sorted(p.name for p in lockspace.iterdir() if p.name.endswith(".lease"))


def test_gc_removes_what_nobody_holds_and_keeps_what_is_held(tmp_path: Path) -> None:
    space = tmp_path / "lockspace"
    space.mkdir()
    # Without the supervisor nothing erases a record when its VM ends (with it, only
    # a supervisor killed outright leaves one): stale records, as a crash leaves them.
    env = env_for(str(space), QEMU_LOCKED_EMULATOR="/bin/true", QEMU_LOCKED_SUPERVISOR="false")
    imgs = [make_image(tmp_path / f"d{i}.img") for i in range(3)]
    for i, img in enumerate(imgs):
        uuid = f"{i:08d}-0000-0000-0000-000000000000"
        assert run([QEMU_LOCKED, "-uuid", uuid, "-drive", f"file={img}"], env=env).returncode == 0
    holder = subprocess.Popen(
        [QEMU_LOCKCTL, "run", "--disk", imgs[0], "--", sys.executable, "-c",
         "import sys; print('ready', flush=True); sys.stdin.read()"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        assert len(lease_files(space)) == 6  # 3 disks + 3 domain leases
        status = json.loads(run([QEMU_LOCKCTL, "status", "--json"], env=env).stdout)["locks"]
        mine = [r for r in status if r.get("source") == "lockspace"]
        assert sorted(r["state"] for r in mine) == ["held"] + ["stale"] * 5
        text = run([QEMU_LOCKCTL, "status"], env=env).stdout
        assert "\n5 stale: lease records nobody holds" in text and "lockspace gc" in text

        dry = run([QEMU_LOCKCTL, "lockspace", "gc", "--dry-run", "--json"], env=env)
        assert dry.returncode == 0 and len(json.loads(dry.stdout)["removed"]) == 5
        assert len(lease_files(space)) == 6

        r = run([QEMU_LOCKCTL, "lockspace", "gc"], env=env)
        assert r.returncode == 0 and "removed 5 unheld lease file(s); 1 held" in r.stdout
        assert lease_files(space) == [leases.lease_name("file:" + os.path.realpath(imgs[0]))]
        # the held lease still refuses a start
        refused = run([QEMU_LOCKED, "-drive", f"file={imgs[0]}"], env=env)
        assert refused.returncode == 3 and "locked" in refused.stderr
    finally:
        holder.communicate("")
    # and goes once its holder is gone
    assert run([QEMU_LOCKCTL, "lockspace", "gc"], env=env).returncode == 0
    assert lease_files(space) == []


def test_gc_on_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    r = run([QEMU_LOCKCTL, "lockspace", "gc", str(tmp_path / "absent")])
    assert r.returncode == 5 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("qemu-lockctl: lockspace_dir ")


# Each acquirer takes the one lease ROUNDS times; inside, it creates a marker
# with O_EXCL, so a second holder at the same moment finds it and says so.
_ACQUIRER = textwrap.dedent(
    """
    import os, sys, time
    from qemu_locked.backends.lockspace import leases
    from qemu_locked.model.claim import Claim

    space_dir, marker, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    moved = 0
    real = leases.Lockspace.still_names
    def counting(self, name, fd):
        global moved
        ok = real(self, name, fd)
        moved += not ok
        return ok
    leases.Lockspace.still_names = counting
    claim = Claim("test:the-one-lease", "exclusive", "the lease")
    me = leases.Identity("h", None, None, os.getpid())
    overlaps = 0
    for _ in range(rounds):
        held = leases.acquire_in(space_dir, [claim], me, time.monotonic() + 60)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            overlaps += 1
        else:
            os.close(fd)
            os.unlink(marker)
        held.release()
    print(overlaps, moved, flush=True)
    """
)


def test_gc_racing_acquirers_never_lets_two_hold_one_lease(tmp_path: Path) -> None:
    space = tmp_path / "lockspace"
    space.mkdir()
    marker = str(tmp_path / "inside")
    env = base_env()
    acquirers = [
        subprocess.Popen(
            [sys.executable, "-c", _ACQUIRER, str(space), marker, "400"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(3)
    ]
    removed = 0
    try:
        # collect for as long as any acquirer runs
        while any(a.poll() is None for a in acquirers):
            removed += len(gc.collect(str(space)).removed)
        results = [a.communicate()[0].split() for a in acquirers]
    finally:
        for a in acquirers:
            if a.poll() is None:
                a.send_signal(signal.SIGKILL)
                a.wait()
    assert all(a.returncode == 0 for a in acquirers)
    overlaps = sum(int(r[0]) for r in results)
    moved = sum(int(r[1]) for r in results)
    assert overlaps == 0
    # the race was real: files were removed under the acquirers, and some of
    # them had locked a removed file and moved on to the new one
    assert removed > 0
    assert moved > 0, (removed, results)


def test_acquirer_that_locked_a_removed_file_takes_the_new_one(tmp_path: Path) -> None:
    """The re-check itself, deterministically: the file is removed (by the
    collector, holding its lock) between an acquirer's open and its lock."""
    space_dir = tmp_path / "lockspace"
    space_dir.mkdir()
    claim = Claim("test:k", "exclusive", "k")
    name = leases.lease_name(claim.key)
    space = leases.Lockspace(str(space_dir))
    try:
        real_open = space.open_lease
        opened: list[int] = []

        def open_then_collected(n: str, create: bool = True, readonly: bool = False) -> int:
            fd = real_open(n, create, readonly)
            if not create:  # the collector's own open
                return fd
            opened.append(fd)
            if len(opened) == 1:  # a collector runs right after our first open
                assert gc.collect_one(space, n) is True
            return fd

        space.open_lease = open_then_collected  # type: ignore[method-assign]
        fd, got = space.open_locked(name, True, 0.0)
        try:
            assert got and len(opened) == 2 and fd == opened[1]
            assert space.still_names(name, fd)
            assert (space_dir / name).exists()
        finally:
            os.close(fd)
    finally:
        space.close()
