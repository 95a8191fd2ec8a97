"""The lockspace backend through the real binary (the contract every backend
passes is in test_backend_contract.py): the lockspace across two "hosts" (different host_name, one in its own mount
namespace), block devices by identity, the domain lease, waiting, and config."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import (
    QEMU_LOCKCTL,
    QEMU_LOCKED,
    base_env,
    byte0_modes,
    has_open,
    make_image,
    run,
    skip_unless_ci,
    wait_for,
)

from qemu_locked.backends.lockspace import leases

BACKENDS = ["direct", "lockspace"]


@pytest.fixture
def lockspace(tmp_path: Path) -> str:
    d = tmp_path / "lockspace"
    d.mkdir()
    return str(d)


def env_for(backend: str, lockspace: str, host: str = "hostA", **extra: str) -> dict[str, str]:
    return base_env(
        QEMU_LOCKED_BACKEND=backend,
        QEMU_LOCKED_LOCKSPACE_DIR=lockspace,
        QEMU_LOCKED_HOST_NAME=host,
        **extra,
    )


def test_two_hosts_one_in_its_own_mount_namespace(start, tmp_path, lockspace) -> None:
    """Host B runs in a private mount namespace: only the shared directory links them."""
    if not shutil.which("unshare"):
        skip_unless_ci("unshare (util-linux) missing")
    img = make_image(tmp_path / "shared.img")
    a = start(
        "-name", "guest=on-a", "-drive", f"file={img}", env=env_for("lockspace", lockspace, "hostA")
    )
    assert a.started()
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", QEMU_LOCKED, "-name", "guest=on-b", "-drive", f"file={img}"],
        env=env_for("lockspace", lockspace, "hostB"), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if r.returncode != 3 and "unshare failed" in r.stderr:
        skip_unless_ci(f"no mount namespaces here: {r.stderr.strip()}")
    assert r.returncode == 3
    assert f"by pid {a.report['pid']}, guest 'on-a' on host 'hostA'" in r.stderr
    # shared leases across hosts
    ro = make_image(tmp_path / "ro.img")
    assert start(
        "-drive", f"file={ro},readonly=on", env=env_for("lockspace", lockspace, "hostA")
    ).started()
    assert start(
        "-drive", f"file={ro},readonly=on", env=env_for("lockspace", lockspace, "hostB")
    ).started()
    # the holder on A dies: B gets the disk
    a.kill()
    b = start("-drive", f"file={img}", env=env_for("lockspace", lockspace, "hostB"))
    assert b.started()


def test_lease_files_records_and_no_record_on_refusal(start, tmp_path, lockspace) -> None:
    img = make_image(tmp_path / "r.img")
    env = env_for("lockspace", lockspace, "hostA")
    a = start("-name", "guest=rec", "-uuid", "1111", "-drive", f"file={img}", env=env)
    assert a.started()
    b = start("-name", "guest=late", "-drive", f"file={img}", env=env)
    assert not b.started()
    name = leases.lease_name("file:" + os.path.realpath(img))
    path = Path(lockspace) / name
    st = path.stat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    fd = os.open(path, os.O_RDONLY)
    try:
        recs = leases.read_records(fd)
    finally:
        os.close(fd)
    assert [(r.host, r.pid, r.guest, r.uuid, r.mode, r.live) for r in recs] == [
        ("hostA", a.report["pid"], "rec", "1111", "exclusive", True)
    ]
    a.kill()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert [r.live for r in leases.read_records(fd)] == [False]  # the record stays, shown stale
    finally:
        os.close(fd)


def test_planted_symlink_is_refused_and_its_target_untouched(start, tmp_path, lockspace) -> None:
    img = make_image(tmp_path / "p.img")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (Path(lockspace) / leases.lease_name("file:" + os.path.realpath(img))).symlink_to(victim)
    r = run([QEMU_LOCKED, "-drive", f"file={img}"], env=env_for("lockspace", lockspace))
    assert (
        r.returncode == 5
        and "is a symlink, refusing" in r.stderr
        and len(r.stderr.splitlines()) == 1
    )
    assert victim.read_text() == "precious\n"
    # status shows the planted file as unusable instead of failing or skipping it
    st = run([QEMU_LOCKCTL, "status", "--json"], env=env_for("lockspace", lockspace))
    # this lockspace's rows only: other processes on the host may hold OFD locks of their own
    (row,) = [r for r in json.loads(st.stdout)["locks"] if r.get("lease")]
    assert (
        st.returncode == 0 and row["state"].startswith("unusable: ") and "symlink" in row["state"]
    )


def test_status_shows_held_then_stale_records(start, tmp_path, lockspace) -> None:
    """The lock, not the record, is the truth: a dead holder's record turns stale."""
    img = make_image(tmp_path / "st.img")
    env = env_for("lockspace", lockspace, "hostA")
    vm = start("-name", "guest=rec", "-drive", f"file={img}", env=env)
    assert vm.started()

    def states() -> list[tuple[str, str, str]]:
        r = run([QEMU_LOCKCTL, "status", "--json", img], env=env)
        assert r.returncode == 0, r.stderr
        return [(row["path"], row["guest"], row["state"]) for row in json.loads(r.stdout)["locks"]
                if row.get("source") == "lockspace"]  # fmt: skip

    assert states() == [(img, "rec", "held")]
    vm.kill()
    assert states() == [(img, "rec", "stale")]


def test_missing_lockspace_dir_is_one_line(tmp_path) -> None:
    img = make_image(tmp_path / "m.img")
    r = run(
        [QEMU_LOCKED, "-drive", f"file={img}"], env=env_for("lockspace", str(tmp_path / "nope"))
    )
    assert r.returncode == 5
    assert (
        r.stderr
        == f"qemu-locked: lockspace_dir {tmp_path / 'nope'} does not exist (create it: qemu-lockctl lockspace init)\n"
    )


def test_block_device_same_lease_through_two_paths(start, tmp_path, lockspace, loop_device) -> None:
    st = os.stat(loop_device)
    other = tmp_path / "same-device-node"
    os.mknod(other, stat.S_IFBLK | 0o600, st.st_rdev)  # a second node, as in libvirt's private /dev
    env = env_for("lockspace", lockspace)
    a = start("-name", "guest=blk", "-drive", f"file={loop_device},format=raw", env=env)
    assert a.started()
    b = start("-drive", f"file={other},format=raw", env=env)
    assert not b.started() and "guest 'blk'" in b.stderr()
    from qemu_locked.lock.keys import disk_key

    assert disk_key(loop_device, st) == disk_key(str(other), os.stat(other)) and disk_key(
        loop_device, st
    ).startswith("loop:")


def test_wait_for_the_holder(start, tmp_path, lockspace) -> None:
    img = make_image(tmp_path / "w.img")
    env = env_for("lockspace", lockspace)
    a = start("-drive", f"file={img}", env=env)
    assert a.started()
    waiter = start(
        "-drive", f"file={img}", env=env_for("lockspace", lockspace, QEMU_LOCKED_WAIT="30")
    )
    (lease,) = Path(lockspace).glob("*.lease")
    # observable: the waiter has the lease open but holds no lock on it
    wait_for(lambda: has_open(waiter.proc.pid, str(lease)) or waiter.proc.poll() is not None,
             "the waiter to open the lease")  # fmt: skip
    assert waiter.proc.poll() is None and byte0_modes(waiter.proc.pid, str(lease)) == []
    a.kill()
    assert waiter.started()
    assert byte0_modes(waiter.proc.pid, str(lease)) == ["exclusive"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opposite_order_with_wait_cannot_deadlock(tmp_path, lockspace, backend) -> None:
    a, b = make_image(tmp_path / "a.img"), make_image(tmp_path / "b.img")
    env = env_for(backend, lockspace, QEMU_LOCKED_WAIT="60", FAKE_QEMU_EXIT="0")
    procs = []
    for _ in range(4):
        for first, second in ((a, b), (b, a)):
            procs.append(subprocess.Popen([QEMU_LOCKED, "-drive", f"file={first}", "-drive", f"file={second}"],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))  # fmt: skip
    assert [p.wait(timeout=120) for p in procs] == [0] * len(procs)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('backend = "nfs"\n', "backend: must be one of direct, lockspace, sanlock, not 'nfs'"),
        ("wait = -1\n", "wait: must be a finite number >= 0, not -1"),
        ('domain_lease = "yes"\n', "domain_lease: must be true or false, not 'yes'"),
        (
            'lockspace_dir = "relative/dir"\n',
            "lockspace_dir: must be an absolute path, not 'relative/dir'",
        ),
        ("bogus = 1\n", "bogus: unknown key"),
        ("[table]\nx = 1\n", "table: unknown key"),
        ("backend = \n", "not valid TOML"),
    ],
)
def test_config_errors_name_the_key_and_file(tmp_path, text: str, message: str) -> None:
    cfg = tmp_path / "q.toml"
    cfg.write_text(text)
    r = run([QEMU_LOCKED, "-m", "1"], env=base_env(QEMU_LOCKED_CONFIG=str(cfg)))
    assert r.returncode == 2
    assert r.stderr.startswith(f"qemu-locked: {cfg}: ") and message in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_env_overrides_the_file(tmp_path) -> None:
    cfg = tmp_path / "q.toml"
    cfg.write_text('backend = "nfs"\n')
    r = run(
        [QEMU_LOCKED, "-m", "1"], env=base_env(QEMU_LOCKED_CONFIG=str(cfg), QEMU_LOCKED_WAIT="soon")
    )
    assert r.returncode == 2 and "nfs" in r.stderr  # the file is still validated
    cfg.write_text('backend = "direct"\nwait = 1\n')
    r = run(
        [QEMU_LOCKED, "-m", "1"], env=base_env(QEMU_LOCKED_CONFIG=str(cfg), QEMU_LOCKED_WAIT="soon")
    )
    assert (
        r.returncode == 2
        and r.stderr == "qemu-locked: $QEMU_LOCKED_WAIT: wait: must be a number, not 'soon'\n"
    )


def test_lockspace_init_and_doctor(tmp_path) -> None:
    from conftest import QEMU_LOCKCTL

    target = tmp_path / "new" / "lockspace"
    r = run([QEMU_LOCKCTL, "lockspace", "init", str(target), "--group", "root"])
    assert r.returncode == 0, r.stderr
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o2770 and st.st_gid == 0
    assert (
        run(
            [QEMU_LOCKCTL, "lockspace", "init", str(target), "--group", "no-such-group-x"]
        ).returncode
        == 2
    )
    # doctor warns that the domain lease is off while lockspace_dir is missing
    r = run(
        [QEMU_LOCKCTL, "doctor", "--json"],
        env=base_env(QEMU_LOCKED_LOCKSPACE_DIR=str(tmp_path / "absent")),
    )
    assert '"domain lease"' in r.stdout and "lockspace init" in r.stdout


def test_direct_backend_block_device_across_private_dev_nodes(
    start, tmp_path, lockspace, loop_device
) -> None:
    """Two VMs reaching one block device through different /dev nodes (as libvirt's
    private /dev gives each QEMU): the direct backend's device lease refuses the second."""
    st = os.stat(loop_device)
    other = tmp_path / "private-dev-node"
    os.mknod(other, stat.S_IFBLK | 0o600, st.st_rdev)
    a = start(
        "-name",
        "guest=blk1",
        "-drive",
        f"file={loop_device},format=raw",
        env=env_for("direct", lockspace),
    )
    assert a.started()
    assert a.locks()[loop_device] == [
        "WRITE"
    ]  # the node lock is still taken too (virtlockd's byte)
    b = start(
        "-name",
        "guest=blk2",
        "-drive",
        f"file={other},format=raw",
        env=env_for("direct", lockspace),
    )
    assert not b.started() and b.proc.returncode == 3
    assert (
        f"cannot write {other}: in use (writing) by pid {a.report['pid']}, guest 'blk1'"
        in b.stderr()
    )


def test_direct_backend_block_device_without_lockspace_fails_closed(tmp_path, loop_device) -> None:
    r = run([QEMU_LOCKED, "-drive", f"file={loop_device},format=raw"],
            env=env_for("direct", str(tmp_path / "absent")))  # fmt: skip
    assert (
        r.returncode == 5
        and "qemu-lockctl lockspace init" in r.stderr
        and len(r.stderr.splitlines()) == 1
    )


def test_domain_lease_by_name_when_there_is_no_uuid(start, lockspace) -> None:
    a = start("-name", "guest=nameonly", "-m", "64", env=env_for("direct", lockspace))
    assert a.started()
    b = start(
        "-name", "nameonly", "-m", "64", env=env_for("direct", lockspace)
    )  # the implied guest= form
    assert not b.started() and b.proc.returncode == 3
    assert (
        f"cannot start domain 'nameonly': already running, held by pid {a.report['pid']}, guest 'nameonly'"
        in b.stderr()
    )
