"""One contract every backend passes, with real processes and real locks.

Each backend is a subclass of :class:`BackendContract` that says how to set
it up (``env``) and how its refusals name a holder (``holder``): direct and
lockspace name the pid and guest, sanlock the host id and host name its
daemon wrote into its delta lease.  The sanlock daemon is started by the
test (no watchdog, unprivileged: sanlock_helpers) and stopped by pid.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, VM, base_env, make_image, run
from sanlock_helpers import Host, hosts, install_sanlock, sanlock_installed

from qemu_locked.backends import combined, load
from qemu_locked.backends.protocol import Backend
from qemu_locked.model import config
from qemu_locked.parse.argv import parse_argv


class BackendContract:
    """What every backend must do.  Subclasses provide ``env`` and ``holder``."""

    name = ""

    @pytest.fixture
    def env(self, tmp_path: Path) -> dict[str, str]:
        raise NotImplementedError

    def holder(self, vm: VM, guest: str) -> str:
        raise NotImplementedError

    def test_module_is_the_configured_backend(self, env) -> None:
        module: Backend = load(config.load(env).backend)
        assert module.NAME == self.name

    def test_exclusive_refuses_a_second_writer_naming_the_holder(self, start, tmp_path, env):
        img = make_image(tmp_path / "a.img")
        a = start("-name", "guest=first", "-drive", f"file={img}", env=env)
        assert a.started(), a.stderr()
        b = start("-name", "guest=second", "-drive", f"file={img}", env=env)
        assert not b.started() and b.proc.returncode == 3
        err = b.stderr()
        assert err.startswith(
            f"qemu-locked: cannot write {img}: in use (writing) by {self.holder(a, 'first')}"
        )
        assert len(err.splitlines()) == 1

    def test_shared_with_shared_and_not_with_exclusive(self, start, tmp_path, env) -> None:
        img = make_image(tmp_path / "s.img")
        assert start("-drive", f"file={img},readonly=on", env=env).started()
        assert start("-drive", f"file={img},readonly=on", env=env).started()
        w = start("-drive", f"file={img}", env=env)
        assert not w.started() and w.proc.returncode == 3

    def test_holder_death_frees_it(self, start, tmp_path, env) -> None:
        img = make_image(tmp_path / "k.img")
        a = start("-drive", f"file={img}", env=env)
        assert a.started()
        a.kill()
        # sanlock frees a dead pid's leases asynchronously: wait for it, as a user would
        again = start("-drive", f"file={img}", env={**env, "QEMU_LOCKED_WAIT": "10"})
        assert again.started(), again.stderr()

    def test_all_or_nothing(self, start, tmp_path, env) -> None:
        a, b = make_image(tmp_path / "a.img"), make_image(tmp_path / "b.img")
        assert start("-drive", f"file={b}", env=env).started()
        vm = start("-drive", f"file={a}", "-drive", f"file={b}", env=env)
        assert not vm.started() and vm.proc.returncode == 3
        assert start("-drive", f"file={a}", env=env).started()  # a was not left held

    def test_refusal_names_every_conflict(self, start, tmp_path, env) -> None:
        a, b = make_image(tmp_path / "a.img"), make_image(tmp_path / "b.img")
        assert start("-drive", f"file={a}", "-drive", f"file={b}", env=env).started()
        vm = start("-drive", f"file={a}", "-drive", f"file={b}", env=env)
        assert not vm.started()
        lines = vm.stderr().splitlines()
        assert sorted(line.split(": in use")[0] for line in lines) == sorted(
            [f"qemu-locked: cannot write {a}", f"qemu-locked: cannot write {b}"]
        )

    def test_domain_lease_refuses_a_second_diskless_start(self, start, env) -> None:
        uuid = "0e4b8f4a-6f43-4d36-9d3a-2b1e5f1c9a77"
        a = start("-name", "guest=solo", "-uuid", uuid, "-m", "64", env=env)
        assert a.started(), a.stderr()
        b = start("-name", "guest=solo", "-uuid", uuid.upper(), "-m", "64", env=env)
        assert not b.started() and b.proc.returncode == 3
        assert f": already running, held by {self.holder(a, 'solo')}" in b.stderr()
        off = start("-name", "guest=solo", "-uuid", uuid,
                    env={**env, "QEMU_LOCKED_DOMAIN_LEASE": "false"})  # fmt: skip
        assert off.started()

    def test_check_reports_without_taking(self, start, tmp_path, env, monkeypatch) -> None:
        if "SANLOCK_RUN_DIR" in env:  # this process talks to the test's daemon too
            monkeypatch.setenv("SANLOCK_RUN_DIR", env["SANLOCK_RUN_DIR"])
        img = make_image(tmp_path / "c.img")
        cfg = config.load(env)
        plan = parse_argv(["-drive", f"file={img}"])
        assert combined.conflicts_all(plan, cfg) == []
        assert combined.conflicts_all(plan, cfg) == []  # checking took nothing
        a = start("-name", "guest=h", "-drive", f"file={img}", env=env)
        assert a.started()
        (conflict,) = combined.conflicts_all(plan, cfg)
        assert conflict[0] == img and self.holder(a, "h") in conflict[2]


class TestDirect(BackendContract):
    name = "direct"

    @pytest.fixture
    def env(self, tmp_path: Path) -> dict[str, str]:
        (tmp_path / "ls").mkdir()
        return base_env(
            QEMU_LOCKED_BACKEND="direct", QEMU_LOCKED_LOCKSPACE_DIR=str(tmp_path / "ls")
        )

    def holder(self, vm: VM, guest: str) -> str:
        return f"pid {vm.report['pid']}, guest '{guest}'"


class TestLockspace(TestDirect):
    name = "lockspace"

    @pytest.fixture
    def env(self, tmp_path: Path) -> dict[str, str]:
        (tmp_path / "ls").mkdir()
        return base_env(QEMU_LOCKED_BACKEND="lockspace", QEMU_LOCKED_LOCKSPACE_DIR=str(tmp_path / "ls"),
                        QEMU_LOCKED_HOST_NAME="hostA")  # fmt: skip

    def holder(self, vm: VM, guest: str) -> str:
        return f"pid {vm.report['pid']}, guest '{guest}' on host 'hostA'"


@pytest.fixture(scope="module")
def sanlock_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Path]]:
    if not sanlock_installed():
        why = install_sanlock()
        if why is not None or not sanlock_installed():
            message = f"sanlock unavailable: {why or 'installed but not found'}"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
    base = tmp_path_factory.mktemp("contract-sanlock")
    with hosts(base, 1) as (host,):
        cfg = base / "sanlock.toml"
        cfg.write_text(
            'backend = "sanlock"\nsanlock_lockspace = "qlcontract"\n'
            f'sanlock_path = "{base / "lockspace.img"}"\n'
            f'sanlock_resources = "{base / "leases.img"}"\n'
            "sanlock_host_id = 1\nsanlock_io_timeout = 1\n"
        )
        env = base_env(QEMU_LOCKED_CONFIG=str(cfg), SANLOCK_RUN_DIR=str(host.run_dir))
        for args in (["init", "--slots", "64"], ["join"]):
            r = run([QEMU_LOCKCTL, "sanlock", *args], env=env)
            assert r.returncode == 0, r.stderr
        yield host, cfg
        subprocess.run([QEMU_LOCKCTL, "sanlock", "leave"], env=env, capture_output=True)


class TestSanlock(BackendContract):
    name = "sanlock"

    @pytest.fixture
    def env(self, sanlock_host: tuple[Host, Path]) -> dict[str, str]:
        host, cfg = sanlock_host
        return base_env(QEMU_LOCKED_CONFIG=str(cfg), SANLOCK_RUN_DIR=str(host.run_dir))

    def holder(self, vm: VM, guest: str) -> str:
        return "host id 1 (host-1)"
