"""The sanlock backend against two real sanlock daemons playing two hosts.

Each host is a ``sanlock daemon`` with its own SANLOCK_RUN_DIR and ``-e
host-N`` name (no watchdog, unprivileged; see sanlock-notes.md); the VMs are
the real qemu-locked wrapper exec'ing the fake QEMU, with the host chosen by
SANLOCK_RUN_DIR and the config by QEMU_LOCKED_CONFIG.  Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, QEMU_LOCKED, VM, base_env, make_image, run, wait_for
from sanlock_helpers import Host, hosts, install_sanlock, sanlock_installed

from qemu_locked.backends.sanlock import area as backend
from qemu_locked.lock import procfs
from qemu_locked.lock.keys import disk_key

IO_TIMEOUT = 1
LOCKSPACE = "qltest"


def _require_sanlock() -> None:
    if sanlock_installed():
        return
    why = install_sanlock()
    if why is None and sanlock_installed():
        return
    message = f"sanlock unavailable: {why or 'installed but not found'}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


class Cluster:
    """Two hosts sharing one lockspace file and one lease file."""

    def __init__(self, base: Path, hs: list[Host]) -> None:
        self.base = base
        self.hosts = hs
        self.lockspace = base / "lockspace.img"
        self.leases = base / "leases.img"
        self.images = base / "images"
        self.images.mkdir()
        self.configs: list[Path] = []
        for h in hs:
            cfg = base / f"{h.name}.toml"
            cfg.write_text(
                'backend = "sanlock"\n'
                f'sanlock_lockspace = "{LOCKSPACE}"\n'
                f'sanlock_path = "{self.lockspace}"\n'
                f'sanlock_resources = "{self.leases}"\n'
                f"sanlock_host_id = {h.number}\n"
                f"sanlock_io_timeout = {IO_TIMEOUT}\n"
            )
            self.configs.append(cfg)

    def env(self, host: int, **extra: str) -> dict[str, str]:
        h = self.hosts[host - 1]
        values = {
            "QEMU_LOCKED_CONFIG": str(self.configs[host - 1]),
            "SANLOCK_RUN_DIR": str(h.run_dir),
        }
        values.update(extra)
        return base_env(**values)

    def lockctl(self, host: int, *args: str) -> subprocess.CompletedProcess[str]:
        return run([QEMU_LOCKCTL, "sanlock", *args], env=self.env(host))

    def init_and_join(self, slots: int = 64) -> dict[str, float]:
        r = self.lockctl(1, "init", "--slots", str(slots), "--json")
        assert r.returncode == 0, r.stderr
        joins = [
            subprocess.Popen(
                [QEMU_LOCKCTL, "sanlock", "join", "--json"],
                env=self.env(h.number),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for h in self.hosts
        ]
        seconds = {}
        for h, p in zip(self.hosts, joins, strict=True):
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            seconds[h.name] = json.loads(out)["seconds"]
        return seconds

    def status(self, host: int = 1) -> dict[str, object]:
        r = self.lockctl(host, "status", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def registered(self, host: int, pid: int) -> bool:
        """Whether pid is registered with that host's daemon (``p PID`` lines)."""
        r = subprocess.run(["sanlock", "client", "status"], env=self.hosts[host - 1].env(),
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        return any(line.split()[:2] == ["p", str(pid)] for line in r.stdout.splitlines())

    def owners(self, key: str, host: int = 1) -> list[tuple[int, str]]:
        """(host id, mode) of every owner of the lease for ``key`` on storage."""
        name = backend.lease_name(key)
        for lease in self.status(host)["leases"]:  # type: ignore[attr-defined]
            if lease["lease"] == name:
                return sorted((o["host_id"], o["mode"]) for o in lease["owners"])
        return []


def file_key(path: str) -> str:
    return disk_key(path, os.stat(path))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    _require_sanlock()
    base = tmp_path_factory.mktemp("sl")
    with hosts(base, 2) as hs:
        c = Cluster(base, hs)
        c.init_and_join()
        yield c


def wait_free(c: Cluster, key: str, timeout: float = 10) -> float:
    """Seconds until the lease for ``key`` has no owner on storage."""
    t0 = time.monotonic()
    while c.owners(key):
        assert time.monotonic() - t0 < timeout, f"{key} still held"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_qemu_gets_the_registration_fd_and_the_image_lock(cluster: Cluster, start) -> None:
    """The registration socket carries the sanlock leases; the image's own
    byte-0 lock makes a hard link or bind mount of it the same disk here."""
    img = make_image(cluster.images / "solo.img")
    vm: VM = start("-name", "guest=solo", "-drive", f"file={img}", env=cluster.env(1))
    assert vm.started(), vm.stderr()
    fds = vm.report["fds"]
    assert len(fds) == 2 and fds[0]["path"].startswith("socket:"), fds  # type: ignore[index]
    assert vm.locks() == {img: ["WRITE"]}
    assert cluster.owners(file_key(img)) == [(1, "exclusive")]
    assert cluster.owners("domain:name:solo") == [(1, "exclusive")]


def test_a_hard_link_is_the_same_disk(cluster: Cluster, start) -> None:
    """Two names of one inode get two sanlock leases (keys are names); the
    image's own byte-0 lock is what refuses the second VM on this host."""
    img = make_image(cluster.images / "linked.img")
    alias = str(cluster.images / "linked-alias.img")
    os.link(img, alias)
    first: VM = start("-name", "guest=ln1", "-drive", f"file={img}", env=cluster.env(1))
    assert first.started(), first.stderr()
    second: VM = start("-name", "guest=ln2", "-drive", f"file={alias}", env=cluster.env(1))
    assert not second.started()
    assert second.proc.returncode == 3
    assert (
        f"cannot write {alias}: in use (writing) by pid {first.proc.pid}, guest 'ln1'"
        in second.stderr()
    )
    assert cluster.owners(file_key(alias)) == []  # refused: nothing of it stays held


def test_cross_host_refusal_names_the_holder(cluster: Cluster, start) -> None:
    img = make_image(cluster.images / "web.img")
    uuid = "8f4a3c1e-1111-4222-8333-944445555666"
    first: VM = start(
        "-name", "guest=web", "-uuid", uuid, "-drive", f"file={img}", env=cluster.env(1)
    )
    assert first.started(), first.stderr()
    second: VM = start("-name", "guest=other", "-drive", f"file={img}", env=cluster.env(2))
    assert not second.started()
    assert second.proc.returncode == 3
    assert second.stderr().splitlines() == [
        f"qemu-locked: cannot write {img}: in use (writing) by host id 1 (host-1)"
    ]
    # The same VM (same UUID) with no disk in common: the domain lease refuses it.
    other = make_image(cluster.images / "web-copy.img")
    twin: VM = start("-name", "guest=web", "-uuid", uuid, "-drive", f"file={other}",
                     env=cluster.env(2))  # fmt: skip
    assert not twin.started()
    assert twin.proc.returncode == 3
    assert (
        f"qemu-locked: cannot start domain {uuid}: already running, held by host id 1 (host-1)"
        in (twin.stderr())
    )
    assert cluster.owners(file_key(other)) == []  # all or nothing


def test_same_host_second_start_is_refused(cluster: Cluster, start) -> None:
    img = make_image(cluster.images / "local.img")
    first: VM = start("-drive", f"file={img}", env=cluster.env(2))
    assert first.started(), first.stderr()
    second: VM = start("-drive", f"file={img}", env=cluster.env(2))
    assert not second.started()
    assert second.proc.returncode == 3
    assert "by host id 2 (host-2)" in second.stderr()


def test_release_when_the_holder_is_killed_both_hosts(cluster: Cluster, start) -> None:
    img = make_image(cluster.images / "k.img")
    key = file_key(img)
    env_wait = {"QEMU_LOCKED_WAIT": "10"}
    vm1: VM = start("-drive", f"file={img}", env=cluster.env(1))
    assert vm1.started(), vm1.stderr()
    vm1.kill(signal.SIGKILL)
    wait_free(cluster, key)
    vm2: VM = start("-drive", f"file={img}", env=cluster.env(2, **env_wait))  # other host
    assert vm2.started(), vm2.stderr()
    assert cluster.owners(key) == [(2, "exclusive")]
    vm2.kill(signal.SIGKILL)
    wait_free(cluster, key)
    vm3: VM = start("-drive", f"file={img}", env=cluster.env(1, **env_wait))  # back again
    assert vm3.started(), vm3.stderr()
    vm4: VM = start("-drive", f"file={img}", env=cluster.env(1))  # same host, after a kill
    assert not vm4.started()
    vm3.kill(signal.SIGKILL)
    vm5: VM = start("-drive", f"file={img}", env=cluster.env(1, **env_wait))
    assert vm5.started(), vm5.stderr()


def test_wait_takes_the_lease_once_freed(cluster: Cluster, start) -> None:
    img = make_image(cluster.images / "w.img")
    holder: VM = start("-drive", f"file={img}", env=cluster.env(1))
    assert holder.started(), holder.stderr()
    waiter: VM = start("-drive", f"file={img}", env=cluster.env(2, QEMU_LOCKED_WAIT="20"))
    # observable: the waiter registered with host 2's daemon, and host 1 still owns the lease
    wait_for(lambda: cluster.registered(2, waiter.proc.pid) or waiter.proc.poll() is not None,
             "the waiter to register")  # fmt: skip
    assert waiter.proc.poll() is None
    assert cluster.owners(file_key(img)) == [(1, "exclusive")]
    holder.kill()
    assert waiter.started(), waiter.stderr()


def test_shared_leases_across_hosts(cluster: Cluster, start) -> None:
    img = make_image(cluster.images / "cluster-fs.img")
    args = ["-drive", f"file={img},format=raw,if=none,id=d0",
            "-device", "virtio-blk-pci,drive=d0,share-rw=on"]  # fmt: skip
    a: VM = start(*args, env=cluster.env(1))
    b: VM = start(*args, env=cluster.env(2))
    assert a.started(), a.stderr()
    assert b.started(), b.stderr()
    assert cluster.owners(file_key(img)) == [(1, "shared"), (2, "shared")]
    writer: VM = start("-drive", f"file={img}", env=cluster.env(1))
    assert not writer.started()
    assert writer.proc.returncode == 3
    assert "in use (sharing) by host id 1 (host-1), host id 2 (host-2)" in writer.stderr()
    a.kill()
    b.kill()
    wait_free(cluster, file_key(img))
    writer2: VM = start("-drive", f"file={img}", env=cluster.env(2, QEMU_LOCKED_WAIT="5"))
    assert writer2.started(), writer2.stderr()


def test_a_vm_spanning_several_leases_is_all_or_nothing(cluster: Cluster, start) -> None:
    disks = [make_image(cluster.images / f"multi-{i}.img") for i in range(4)]
    busy = disks[2]
    holder: VM = start("-name", "guest=holder", "-drive", f"file={busy}", env=cluster.env(1))
    assert holder.started(), holder.stderr()
    args = ["-name", "guest=big"]
    for d in disks:
        args += ["-drive", f"file={d}"]
    vm: VM = start(*args, env=cluster.env(2))
    assert not vm.started()
    assert vm.proc.returncode == 3
    err = vm.stderr().splitlines()
    assert err == [f"qemu-locked: cannot write {busy}: in use (writing) by host id 1 (host-1)"]
    for d in disks:
        if d != busy:
            assert cluster.owners(file_key(d)) == [], d
    assert cluster.owners("domain:name:big") == []
    assert cluster.owners(file_key(busy)) == [(1, "exclusive")]
    holder.kill()
    wait_free(cluster, file_key(busy))
    again: VM = start(*args, env=cluster.env(2))
    assert again.started(), again.stderr()
    assert len(again.report["fds"]) == 1 + len(disks)  # type: ignore[arg-type]
    for d in disks:
        assert cluster.owners(file_key(d)) == [(2, "exclusive")]


def test_leases_land_in_distinct_slots_and_are_found_again(cluster: Cluster) -> None:
    table = cluster.status(2)
    names = [lease["lease"] for lease in table["leases"]]  # type: ignore[attr-defined]
    slots = [lease["slot"] for lease in table["leases"]]  # type: ignore[attr-defined]
    assert len(set(names)) == len(names)
    assert len(set(slots)) == len(slots)
    assert table["joined"] and table["slots"] == 64


def test_lease_slots_probe_linearly_on_collision(cluster: Cluster, start) -> None:
    """Two keys with the same home slot (found by search) get neighbouring slots."""
    n = 64
    wanted = backend.home_slot(file_key(str(cluster.images)) + "/probe-0.img", n)
    first = make_image(cluster.images / "probe-0.img")
    second = None
    for i in range(1, 5000):
        cand = str(cluster.images / f"probe-{i}.img")
        if backend.home_slot("file:" + os.path.realpath(cand), n) == wanted:
            second = make_image(Path(cand))
            break
    assert second is not None
    a: VM = start("-drive", f"file={first}", env=cluster.env(1))
    b: VM = start("-drive", f"file={second}", env=cluster.env(2))
    assert a.started(), a.stderr()
    assert b.started(), b.stderr()
    assert cluster.owners(file_key(first)) == [(1, "exclusive")]
    assert cluster.owners(file_key(second)) == [(2, "exclusive")]
    by_name = {lease["lease"]: lease["slot"] for lease in cluster.status()["leases"]}  # type: ignore[attr-defined]
    slots = {by_name[backend.lease_name(file_key(p))] for p in (first, second)}
    assert len(slots) == 2


def test_lockctl_errors_are_one_line(cluster: Cluster) -> None:
    r = cluster.lockctl(1, "init")
    assert r.returncode == 5
    assert r.stderr.startswith("qemu-lockctl: sanlock: ") and r.stderr.count("\n") == 1
    assert "already holds lockspace 'qltest'" in r.stderr and "Traceback" not in r.stderr
    bad = run(
        [QEMU_LOCKCTL, "sanlock", "join"],
        env=cluster.env(1, QEMU_LOCKED_SANLOCK_HOST_ID="0"),
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("qemu-lockctl: ") and "sanlock_host_id" in bad.stderr
    assert bad.stderr.count("\n") == 1


def test_doctor_reports_binding_daemon_join_and_no_fencing(cluster: Cluster) -> None:
    r = cluster.lockctl(2, "doctor", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    found = {f["check"]: f for f in json.loads(r.stdout)}
    assert found["sanlock binding"]["status"] == "OK"
    assert "sanlock.cpython-311" in found["sanlock binding"]["message"]
    assert found["sanlock daemon"]["status"] == "OK"
    assert found["sanlock join"]["status"] == "OK"
    assert "host id 2" in found["sanlock join"]["message"]
    assert found["sanlock fencing"]["status"] == "WARN"
    assert "NO fencing" in found["sanlock fencing"]["message"]
    assert "io_timeout 1" in found["sanlock lockspace"]["message"]


def test_no_daemon_is_one_clear_line(cluster: Cluster, tmp_path: Path) -> None:
    img = make_image(tmp_path / "nodaemon.img")
    env = cluster.env(1, SANLOCK_RUN_DIR=str(tmp_path))
    r = subprocess.run([QEMU_LOCKED, "-drive", f"file={img}"], env=env, capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    assert r.returncode == 5
    assert r.stderr == (
        "qemu-locked: sanlock: register: no sanlock daemon reachable at "
        f"{tmp_path}/sanlock.sock (Sanlock registration failed: No such file or directory (2))\n"
    )
    d = run([QEMU_LOCKCTL, "sanlock", "doctor"], env=env)
    assert d.returncode == 1 and "not reachable" in d.stdout


def test_status_rows_feed_qemu_lockctl_status(cluster: Cluster, start) -> None:
    img = make_image(cluster.images / "rows.img")
    vm: VM = start("-name", "guest=rows", "-drive", f"file={img}", env=cluster.env(1))
    assert vm.started(), vm.stderr()
    r = run(
        [
            str(Path(QEMU_LOCKED).parent / "python"),
            "-c",
            "import json,sys\nfrom qemu_locked.model import config\n"
            "from qemu_locked.backends.sanlock import admin\n"
            "rows = admin.status_rows(config.load(), [sys.argv[1]])\n"
            "print(json.dumps([r.to_json() for r in rows]))",
            img,
        ],
        env=cluster.env(1),
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 1
    assert rows[0]["pid"] == vm.report["pid"] and rows[0]["guest"] == "rows"
    assert rows[0]["host"] == "host-1" and rows[0]["mode"] == "exclusive"


@pytest.mark.slow
def test_host_crash_failover(tmp_path_factory: pytest.TempPathFactory, start) -> None:
    """Host 1 crashes (its daemon and its VM die, SIGKILL): host 2 gets the
    lease after the failover time (60 s + 8 * io_timeout here).  Both "hosts"
    are this machine, so host 1's VM must really die: alive, its byte-0 lock
    on the image would keep host 2's VM out (as it should on one machine)."""
    _require_sanlock()
    base = tmp_path_factory.mktemp("slf")
    with hosts(base, 2) as hs:
        c = Cluster(base, hs)
        c.init_and_join(slots=8)
        img = make_image(c.images / "failover.img")
        vm1: VM = start("-name", "guest=fo", "-drive", f"file={img}", env=c.env(1))
        assert vm1.started(), vm1.stderr()
        hs[0].crash()
        vm1.kill()
        t0 = time.monotonic()
        vm2: VM = start("-name", "guest=fo", "-drive", f"file={img}",
                        env=c.env(2, QEMU_LOCKED_WAIT="150"))  # fmt: skip
        assert vm2.started(timeout=160), vm2.stderr()
        elapsed = time.monotonic() - t0
        assert 60 <= elapsed <= 110, elapsed
        (base / "failover-seconds").write_text(f"{elapsed:.1f}\n")
        print(f"failover after {elapsed:.1f} s")


def test_lease_files_are_sparse_and_aligned(cluster: Cluster) -> None:
    st = os.stat(cluster.leases)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == 64 * backend.ALIGN
    assert os.stat(cluster.lockspace).st_size == backend.ALIGN


def test_check_names_the_cross_host_holder(cluster: Cluster, start) -> None:
    img = make_image(cluster.images / "check.img")
    vm: VM = start("-name", "guest=chk", "-drive", f"file={img}", env=cluster.env(1))
    assert vm.started(), vm.stderr()
    r = run([QEMU_LOCKCTL, "check", "--json", "--", "-name", "guest=chk2", "-drive",
             f"file={img},readonly=on"], env=cluster.env(2))  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    found = json.loads(r.stdout)["conflicts"]
    assert [(c["path"], c["wanted"], c["held_by"]) for c in found] == [
        (img, "shared", "(exclusive) by host id 1 (host-1)")
    ]
    free = make_image(cluster.images / "check-free.img")
    ok = run([QEMU_LOCKCTL, "check", "--", "-drive", f"file={free}"], env=cluster.env(2))
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_block_devices_are_keyed_by_stable_id(cluster: Cluster, start, loop_device: str) -> None:
    """A block device's key is an identity every host shares (here, read from
    sysfs: the loop device's backing file), never its host-local /dev name."""
    sysfs = Path(f"/sys/block/{Path(loop_device).name}/loop/backing_file")
    backing = sysfs.read_text().strip()
    assert file_key(loop_device) == f"loop:{os.path.realpath(backing)}@0"
    # Through the wrapper: the block device is leased across hosts like a file.
    vm: VM = start("-drive", f"file={loop_device},format=raw", env=cluster.env(1))
    assert vm.started(), vm.stderr()
    other: VM = start("-drive", f"file={loop_device},format=raw", env=cluster.env(2))
    assert not other.started()
    assert f"cannot write {loop_device}: in use (writing) by host id 1 (host-1)" in other.stderr()
    # `status` from the other host names the device by the path it was given, its key beside
    r = run([QEMU_LOCKCTL, "status", "--json", loop_device], env=cluster.env(2))
    assert r.returncode == 0, r.stderr
    rows = [row for row in json.loads(r.stdout)["locks"] if row.get("source") == "sanlock"]
    assert [(row["path"], row["key"], row["host"], row["mode"]) for row in rows] == [
        (loop_device, file_key(loop_device), "host-1", "exclusive")
    ], rows


def test_status_for_a_path_names_holder_host_pid_and_guest(cluster: Cluster, start) -> None:
    img = make_image(cluster.images / "st.img")
    vm: VM = start("-name", "guest=stvm", "-drive", f"file={img}", env=cluster.env(1))
    assert vm.started(), vm.stderr()
    r = cluster.lockctl(1, "status", img, "domain:name:stvm")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("this host (id 1) joined")
    pid = vm.report["pid"]
    held = [ln.split(None, 2)[2] for ln in lines if ln.lstrip().startswith("slot")]
    assert sorted(held) == sorted(
        [
            f"{img}  host id 1 (host-1) exclusive, pid {pid} guest 'stvm'",
            f"domain:name:stvm  host id 1 (host-1) exclusive, pid {pid} guest 'stvm'",
        ]
    )
    missing = cluster.lockctl(1, "status", str(cluster.images / "nope.img"))
    assert missing.returncode == 4
    assert missing.stderr.startswith("qemu-lockctl: ") and missing.stderr.count("\n") == 1


_HOLD_ALLOCATOR = """
import os, sys, time
from qemu_locked.model import config
from qemu_locked.backends.sanlock import area as b
from qemu_locked.backends.sanlock.binding import binding
sl = binding()
area = b.Area(config.load())
fd = sl.register()
sl.acquire(area.lockspace, f"{b.ALLOC_PREFIX}{area.slots(sl)}".encode(), area.disk(0), slkfd=fd)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_stuck_allocator_blocks_only_new_leases(cluster: Cluster, start) -> None:
    """Creating a lease needs the allocator lease; a lease that exists does not."""
    old = make_image(cluster.images / "exists.img")
    first: VM = start("-drive", f"file={old}", env=cluster.env(2))
    assert first.started(), first.stderr()
    first.kill()
    wait_free(cluster, file_key(old))
    holder = subprocess.Popen(
        [str(Path(QEMU_LOCKED).parent / "python"), "-c", _HOLD_ALLOCATOR],
        env=cluster.env(1),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        new = make_image(cluster.images / "brand-new.img")
        t0 = time.monotonic()
        vm: VM = start("-drive", f"file={new}", env=cluster.env(2))
        assert not vm.started(timeout=30)
        assert time.monotonic() - t0 >= backend.ALLOC_WAIT
        assert vm.proc.returncode == 5
        assert vm.stderr() == (
            f"qemu-locked: sanlock: cannot create the lease for {new}: the lease allocator "
            f"(slot 0 of {cluster.leases}) is held (exclusive) by host id 1 (host-1)\n"
        )
        again: VM = start("-drive", f"file={old}", env=cluster.env(2))
        assert again.started(), again.stderr()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.qemu
def test_real_qemu_keeps_the_leases_until_it_dies(cluster: Cluster, start) -> None:
    """The real qemu-system-x86_64 (TCG) keeps the inherited registration: the
    lease stays held while it runs (after it opened and locked its image) and is
    freed when it is killed."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI: qemu-system-x86_64 must be installed")
        pytest.skip("qemu-system-x86_64 not installed")
    img = make_image(cluster.images / "real.img")
    args = ["-name", "guest=realvm", "-machine", "none", "-accel", "tcg", "-nodefaults",
            "-display", "none", "-S", "-m", "16", "-drive", f"file={img},format=raw,if=none,id=d0"]  # fmt: skip
    proc = subprocess.Popen(
        [QEMU_LOCKED, *args],
        env=cluster.env(1, QEMU_LOCKED_EMULATOR=qemu),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _qemu_image_locked(proc.pid, img):  # QEMU's own locks: it is up
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert os.readlink(f"/proc/{proc.pid}/exe") == os.path.realpath(qemu)
        time.sleep(0.5)
        assert cluster.owners(file_key(img)) == [(1, "exclusive")]
        assert cluster.owners("domain:name:realvm") == [(1, "exclusive")]
        other = run([QEMU_LOCKED, *args], env=cluster.env(2, QEMU_LOCKED_EMULATOR=qemu))
        assert other.returncode == 3
        assert "by host id 1 (host-1)" in other.stderr
        proc.kill()
        proc.wait(10)
        wait_free(cluster, file_key(img))
        wait_free(cluster, "domain:name:realvm")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _qemu_image_locked(pid: int, path: str) -> bool:
    """QEMU's own image locks (bytes 100-204) are there: it has opened the image."""
    return any(start >= 100 for _k, _m, start in procfs.fd_locks(pid).get(path, []))


def test_a_vm_without_disks_still_gets_its_domain_lease(cluster: Cluster, start) -> None:
    uuid = "3b2f9d6c-0000-4e1a-9c5b-7a6d5e4f3c2b"
    first: VM = start("-name", "guest=diskless", "-uuid", uuid, "-m", "64", env=cluster.env(1))
    assert first.started(), first.stderr()
    twin: VM = start("-name", "guest=diskless", "-uuid", uuid, "-m", "64", env=cluster.env(2))
    assert not twin.started() and twin.proc.returncode == 3
    assert (
        f"cannot start domain {uuid}: already running, held by host id 1 (host-1)" in twin.stderr()
    )


def test_migration_destination_waits_for_the_source(cluster: Cluster, start) -> None:
    """-incoming on host 2 while host 1's source holds the leases: the destination
    starts, its keeper takes the leases once the source is gone and holds them
    until the destination exits; a third start is refused throughout."""
    img = make_image(cluster.images / "migrating.img")
    uuid = "5e6f7a8b-1111-4c2d-9e3f-405162738495"
    key = file_key(img)
    src: VM = start(
        "-name", "guest=mig", "-uuid", uuid, "-drive", f"file={img}", env=cluster.env(1)
    )
    assert src.started(), src.stderr()
    dst: VM = start("-name", "guest=mig", "-uuid", uuid, "-drive", f"file={img}", "-incoming", "defer",
                    env=cluster.env(2))  # fmt: skip
    assert dst.started(), dst.stderr()  # not refused
    third: VM = start("-name", "guest=third", "-drive", f"file={img}", env=cluster.env(2))
    assert not third.started() and "by host id 1 (host-1)" in third.stderr()
    src.kill(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while cluster.owners(key) != [(2, "exclusive")]:
        assert time.monotonic() < deadline, cluster.owners(key)
        time.sleep(0.1)
    assert cluster.owners(f"domain:uuid:{uuid}") == [(2, "exclusive")]
    again: VM = start("-name", "guest=third", "-drive", f"file={img}", env=cluster.env(1))
    assert not again.started() and "by host id 2 (host-2)" in again.stderr()
    dst.kill(signal.SIGKILL)  # the keeper holding the leases exits with it
    wait_free(cluster, key, timeout=20)


def test_main_doctor_includes_the_sanlock_findings(cluster: Cluster) -> None:
    r = run([QEMU_LOCKCTL, "doctor", "--json"], env=cluster.env(1))
    checks = {f["check"]: f for f in json.loads(r.stdout)["findings"]}
    assert any("sanlock" in c for c in checks), checks
    assert any(
        "fencing" in f["message"].lower() or "watchdog" in f["message"].lower()
        for f in checks.values()
    )


def test_hot_plug_through_the_monitor_guard_takes_a_lease_for_qemu(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A disk added over QMP (libvirt's blockdev-add) gets a sanlock lease of its
    own, held for QEMU: another host is refused it, and it is freed when the
    nodes go (blockdev-del)."""
    from guard_helpers import QEMU, Domain

    if QEMU is None:
        pytest.fail("qemu-system-x86_64 must be installed (make test installs it)")
    qcow = shutil.which("qemu-img")
    assert qcow is not None
    base, extra = str(cluster.images / "gs-base.qcow2"), str(cluster.images / "gs-extra.qcow2")
    for path in (base, extra):
        subprocess.run([qcow, "create", "-q", "-f", "qcow2", path, "16M"], check=True)
    vm = Domain(
        tmp_path,
        "gsl",
        [base],
        env=cluster.env(
            1,
            QEMU_LOCKED_EMULATOR=QEMU,
            QEMU_LOCKED_SUPERVISOR="false",
            QEMU_LOCKED_MONITOR_GUARD="true",
        ),
    )
    try:
        q = vm.qmp()
        r = q.cmd("blockdev-add", driver="file", filename=extra,
                  **{"node-name": "xs", "auto-read-only": True})  # fmt: skip
        assert r["return"] == {}, r
        r = q.cmd("blockdev-add", driver="qcow2", file="xs", backing=None,
                  **{"node-name": "xf", "read-only": False})  # fmt: skip
        assert r["return"] == {}, r
        assert cluster.owners(file_key(extra)) == [(1, "exclusive")]
        other = run([QEMU_LOCKED, "-name", "guest=gs2", "-drive", f"file={extra}"],
                    env=cluster.env(2))  # fmt: skip
        assert other.returncode == 3 and "by host id 1 (host-1)" in other.stderr, other.stderr
        assert q.cmd("blockdev-del", **{"node-name": "xf"})["return"] == {}
        assert q.cmd("blockdev-del", **{"node-name": "xs"})["return"] == {}
        wait_free(cluster, file_key(extra))
        assert cluster.owners(file_key(base)) == [(1, "exclusive")]  # the start-time lease stays
        q.close()
    finally:
        vm.stop()
