"""Races: many qemu-locked starts on one disk at once; exactly one may win."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import QEMU_LOCKED, base_env, lock_free, make_image
from stress.support import scale


@pytest.mark.parametrize("backend", ["direct", "lockspace"])
def test_concurrent_starts_exactly_one_wins(tmp_path: Path, tally, backend: str) -> None:
    starts, rounds = scale(8, 32), scale(5, 50)
    img = make_image(tmp_path / "race.img")
    space = tmp_path / "ls"
    space.mkdir()
    for r in range(rounds):
        procs = []
        for i in range(starts):
            env = base_env(QEMU_LOCKED_BACKEND=backend, QEMU_LOCKED_LOCKSPACE_DIR=str(space),
                           QEMU_LOCKED_HOST_NAME=f"host{i % 2}")  # fmt: skip
            procs.append(subprocess.Popen([QEMU_LOCKED, "-name", f"guest=r{r}v{i}", "-drive", f"file={img}"],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
        winners = []
        for p in procs:
            line = p.stdout.readline() if p.stdout else ""
            if line.startswith("{"):
                winners.append(p)
            else:
                assert p.wait(60) == 3, p.stderr.read() if p.stderr else ""
        assert len(winners) == 1, f"round {r}: {len(winners)} winners"
        for p in winners:
            p.kill()
            p.wait()
        for p in procs:
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()
        assert lock_free(img), f"round {r}: left locked"
    tally(f"race-{backend}", f"{starts} concurrent starts on one disk ({backend} backend, 2 hosts)",
          starts * rounds, f"{rounds} rounds: exactly one winner each, all others refused, nothing left locked")  # fmt: skip


@pytest.mark.parametrize("backend", ["direct", "lockspace"])
def test_opposite_order_with_wait_no_deadlock(tmp_path: Path, tally, backend: str) -> None:
    pairs, rounds = scale(4, 16), scale(2, 10)
    a, b = make_image(tmp_path / "a.img"), make_image(tmp_path / "b.img")
    space = tmp_path / "ls"
    space.mkdir()
    for _ in range(rounds):
        procs = []
        for i in range(pairs):
            for first, second in ((a, b), (b, a)):
                env = base_env(QEMU_LOCKED_BACKEND=backend, QEMU_LOCKED_LOCKSPACE_DIR=str(space),
                               QEMU_LOCKED_WAIT="120", FAKE_QEMU_EXIT="0", QEMU_LOCKED_HOST_NAME=f"h{i % 2}")  # fmt: skip
                procs.append(subprocess.Popen([QEMU_LOCKED, "-drive", f"file={first}", "-drive", f"file={second}"],
                                              env=env, stdout=subprocess.DEVNULL))  # fmt: skip
        assert [p.wait(timeout=300) for p in procs] == [0] * len(procs)
    tally(f"order-{backend}", f"VMs taking disks A,B and B,A in opposite order with wait ({backend})",
          pairs * 2 * rounds, "no deadlock: every start ran")  # fmt: skip
