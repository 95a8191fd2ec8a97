"""The audit trail (issue 23, item 1): one line per refusal, lock and keeper
timeout in the system log, read back by `qemu-lockctl log`.

A real rsyslogd the tests start themselves: imuxsock on a private socket (never
the machine's /dev/log), writing the traditional file format (Debian 12's
default) and RFC 3339 (rsyslog's RSYSLOG_FileFormat) to files under a private
directory.  Stopped by its pid.  With nobody listening, a full queue or a
socket this user may not write to, starts go on and nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import test_supervisor
from conftest import (
    QEMU_LOCKCTL,
    QEMU_LOCKED,
    VM,
    apt_install,
    base_env,
    lock_free,
    make_image,
    skip_unless_ci,
    wait_for,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from qemu_locked.lock import procfs

holder = test_supervisor.holder  # the same fixture: a process holding a file's byte 0
HOST = os.uname().nodename
_CONF = """\
global(workDirectory="{dir}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{dir}/log.sock" CreatePath="on" RateLimit.Interval="0")
*.* action(type="omfile" file="{dir}/syslog" template="RSYSLOG_TraditionalFileFormat")
*.* action(type="omfile" file="{dir}/syslog-rfc3339" template="RSYSLOG_FileFormat")
"""


class Syslog:
    """A private rsyslogd: ``socket`` is where lines go, ``file`` and ``rfc3339``
    where it writes them."""

    def __init__(self) -> None:
        why = apt_install("rsyslog")
        daemon = shutil.which("rsyslogd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        if why is not None or daemon is None:
            skip_unless_ci(f"rsyslogd (apt: rsyslog): {why}")
        # Short: an AF_UNIX path holds 108 bytes; readable by the `nobody` test.
        self.dir = Path(tempfile.mkdtemp(prefix="ql-syslog-"))
        self.dir.chmod(0o755)
        self.socket = str(self.dir / "log.sock")
        self.file = self.dir / "syslog"
        self.rfc3339 = self.dir / "syslog-rfc3339"
        self.marks = 0
        conf = self.dir / "rsyslog.conf"
        conf.write_text(_CONF.format(dir=self.dir))
        self.proc = subprocess.Popen(
            [str(daemon), "-n", "-f", str(conf), "-i", str(self.dir / "rsyslogd.pid")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for(lambda: os.path.exists(self.socket) or self.proc.poll() is not None, "its socket")
        assert self.proc.poll() is None, self.proc.communicate()[1]

    def ours(self, path: Path | None = None) -> list[str]:
        """The qemu-locked lines the daemon wrote so far."""
        path = path or self.file
        return (
            [ln for ln in path.read_text().splitlines() if " qemu-locked[" in ln]
            if path.exists()
            else []
        )

    def flush(self, *gone: int) -> None:
        """Once the processes ``gone`` have exited, everything they sent is in the
        files: a mark sent after it through the same socket is written after it."""
        from fail_closed import alive

        wait_for(lambda: not any(alive(pid) for pid in gone), f"{gone} to exit")
        self.marks += 1
        mark = f"mark {self.marks} {time.monotonic()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(f"<30>audit-test: {mark}".encode(), self.socket)
        for path in (self.file, self.rfc3339):
            wait_for(lambda p=path: p.exists() and mark in p.read_text(), "the mark")

    def env(self, **extra: str) -> dict[str, str]:
        return base_env(**{"QEMU_LOCKED_AUDIT_SOCKET": self.socket,
                            "QEMU_LOCKED_AUDIT_FILE": str(self.file), **extra})  # fmt: skip

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def syslog() -> Iterator[Syslog]:
    daemon = Syslog()
    try:
        yield daemon
    finally:
        daemon.stop()


def helpers(vm_pid: int) -> list[int]:
    """The processes beside this QEMU (a pidfd of it in their fds)."""
    return [pid for pid in procfs.pids()
            if any(f"Pid:\t{vm_pid}\n" in info for _fd, t, info in procfs.fd_entries(pid)
                   if "pidfd" in t)]  # fmt: skip


def log(env: dict[str, str], *args: str) -> list[dict[str, object]]:
    r = subprocess.run([QEMU_LOCKCTL, "log", "--json", *args], env=env, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out: list[dict[str, object]] = json.loads(r.stdout)
    return out


def fields(entry: dict[str, object]) -> dict[str, object]:
    """An entry without its time (the daemon's clock)."""
    return {k: v for k, v in entry.items() if k != "time"}


def started(vm: VM) -> VM:
    assert vm.started(), vm.stderr()
    return vm


def test_a_refused_start_is_one_line_naming_the_holder(syslog: Syslog, tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img")
    env = syslog.env()
    a = started(VM(["-name", "guest=a", "-drive", f"file={img}"], env))
    try:
        b = VM(["-name", "guest=b", "-drive", f"file={img}"], env)
        assert not b.started()
        assert b.proc.returncode == 3
        syslog.flush()
        entries = log(env)
    finally:
        a.kill()
    key = f"file:{os.path.realpath(img)}"
    common = {"path": img, "key": key, "mode": "exclusive", "host": HOST,
              "origin": f"-drive file={img}", "detail": None}  # fmt: skip
    assert [fields(e) for e in entries] == [
        {"action": "locked", **common, "guest": "a", "pid": a.proc.pid, "holder": None},
        {"action": "refused", **common, "guest": "b", "pid": b.proc.pid,
         "holder": f"in use (writing) by pid {a.proc.pid}, guest 'a'"},
    ]  # fmt: skip
    # The line itself, as rsyslog wrote it (facility daemon: the PRI is not in the file).
    assert syslog.ours()[1].endswith(
        f" {HOST} qemu-locked[{b.proc.pid}]: action=refused path={img} key={key} mode=exclusive "
        f"guest=b pid={b.proc.pid} host={HOST} holder=\"in use (writing) by pid {a.proc.pid}, guest 'a'\" "
        f'origin="-drive file={img}"'
    ), syslog.ours()
    # Both file formats read back the same; each entry has the daemon's time.
    env3339 = dict(env, QEMU_LOCKED_AUDIT_FILE=str(syslog.rfc3339))
    assert [fields(e) for e in log(env3339)] == [fields(e) for e in entries]
    for e in entries:
        when = datetime.fromisoformat(str(e["time"]))
        assert abs(when - datetime.now().astimezone()) < timedelta(hours=1)


def test_a_domain_lease_refused_is_named_by_its_key(syslog: Syslog, tmp_path: Path) -> None:
    """The lockspace backend: the same VM started twice (other disks) is refused its domain lease."""
    uuid = "11111111-2222-4333-8444-555555555555"
    lockspace = tmp_path / "lockspace"
    lockspace.mkdir()
    env = syslog.env(QEMU_LOCKED_BACKEND="lockspace", QEMU_LOCKED_LOCKSPACE_DIR=str(lockspace))
    one, two = make_image(tmp_path / "one.img"), make_image(tmp_path / "two.img")
    a = started(VM(["-name", "guest=vm1", "-uuid", uuid, "-drive", f"file={one}"], env))
    try:
        b = VM(["-name", "guest=vm1", "-uuid", uuid, "-drive", f"file={two}"], env)
        assert not b.started()
        syslog.flush()
        entries = [fields(e) for e in log(env) if e["action"] == "refused"]
    finally:
        a.kill()
    assert entries == [{
        "action": "refused", "path": f"domain {uuid}", "key": f"domain:uuid:{uuid}",
        "mode": "exclusive", "guest": "vm1", "pid": b.proc.pid, "host": HOST,
        "holder": f"in use (writing) by pid {a.proc.pid}, guest 'vm1' on host '{HOST}'", "origin": None,
        "detail": None,
    }]  # fmt: skip


def test_log_path_and_since_filter(syslog: Syslog, tmp_path: Path) -> None:
    one, two = make_image(tmp_path / "one.img"), make_image(tmp_path / "two.img")
    link = tmp_path / "link.img"
    link.symlink_to(two)
    env = syslog.env(QEMU_LOCKED_AUDIT_FILE=str(syslog.rfc3339), FAKE_QEMU_EXIT="0")
    started(VM(["-name", "guest=first", "-drive", f"file={one}"], env)).proc.wait(30)
    syslog.flush()
    (first,) = log(env)
    started(VM(["-name", "guest=second", "-drive", f"file={two}"], env)).proc.wait(30)
    syslog.flush()
    assert [e["guest"] for e in log(env, one)] == ["first"]
    assert [e["guest"] for e in log(env, two)] == ["second"]
    assert [e["guest"] for e in log(env, str(link))] == ["second"]  # another name, same disk
    assert [e["guest"] for e in log(env, f"file:{os.path.realpath(two)}")] == ["second"]  # its key
    assert log(env, str(tmp_path / "other.img")) == []
    # Just after the first line (the daemon stamps microseconds): only the second.
    after = (datetime.fromisoformat(str(first["time"])) + timedelta(microseconds=1)).isoformat()
    assert [e["guest"] for e in log(env, "--since", after)] == ["second"]
    assert [e["guest"] for e in log(env, "--since", "1h")] == ["first", "second"]
    assert log(env, "--since", "2099-01-01") == []
    # The table: one row per line.
    r = subprocess.run([QEMU_LOCKCTL, "log", two], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    head, row = r.stdout.splitlines()
    assert head.split() == ["TIME", "ACTION", "MODE", "GUEST", "PID", "HOST", "PATH", "ORIGIN",
                            "HOLDER"]  # fmt: skip
    assert row.split()[1:7] == ["locked", "writing", "second", row.split()[4], HOST, two]


def test_bad_since_and_an_unreadable_log_are_one_line(tmp_path: Path) -> None:
    env = base_env(QEMU_LOCKED_AUDIT_FILE=str(tmp_path / "none"))
    r = subprocess.run([QEMU_LOCKCTL, "log", "--since", "soon"], env=env, capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr == (
        "qemu-lockctl: --since 'soon': give a time ago (30s, 10min, 1h, 2d) or an ISO time "
        "(2026-12-06 or 2026-12-06T12:30)\n"
    )
    r = subprocess.run([QEMU_LOCKCTL, "log"], env=env, capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (
        4, f"qemu-lockctl: cannot read {tmp_path / 'none'}: No such file or directory\n"
    )  # fmt: skip
    private = tmp_path / "syslog"
    private.write_text("")
    private.chmod(0o600)
    env["QEMU_LOCKED_AUDIT_FILE"] = str(private)
    tmp_path.chmod(0o755)
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                        QEMU_LOCKCTL, "log"], env=env, capture_output=True, text=True)  # fmt: skip
    assert (r.returncode, r.stderr) == (
        4, f"qemu-lockctl: cannot read {private}: Permission denied\n"
    )  # fmt: skip


# -- nobody listening ----------------------------------------------------------------


def listener(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    return sock


def received(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


@pytest.mark.parametrize("case", ["no such socket", "nobody bound", "queue full", "denied",
                                  "audit off"])  # fmt: skip
def test_a_start_goes_on_when_nothing_can_be_written(case: str) -> None:
    # A directory `nobody` can reach (pytest's own is root's alone).
    top = Path(tempfile.mkdtemp(prefix="ql-audit-"))
    try:
        top.chmod(0o755)
        img = make_image(top / "d.img")
        os.chmod(img, 0o666)
        path = str(top / "log.sock")
        env = base_env(QEMU_LOCKED_AUDIT_SOCKET=path, FAKE_QEMU_EXIT="0")
        argv = [QEMU_LOCKED, "-name", "guest=g", "-drive", f"file={img}"]
        sock = listener(path)
        # The control: listening, the start's lock is one datagram, facility daemon (3),
        # severity info (6): <30>.
        r = subprocess.run(argv, env=env, capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        pid = json.loads(r.stdout.splitlines()[0])["pid"]
        assert received(sock) == [
            f"<30>qemu-locked[{pid}]: action=locked path={img} key=file:{os.path.realpath(img)} "
            f'mode=exclusive guest=g pid={pid} host={HOST} origin="-drive file={img}"'.encode()
        ]
        if case == "no such socket":
            sock.close()
            os.unlink(path)
        elif case == "nobody bound":
            sock.close()  # the file stays: a connect is refused
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
                with pytest.raises(ConnectionRefusedError):
                    probe.sendto(b"x", path)
        elif case == "queue full":
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
                filler.setblocking(False)
                with pytest.raises(BlockingIOError):
                    while True:
                        filler.sendto(b"filler", path)
        elif case == "denied":
            os.chmod(path, 0o600)  # root's alone; the start runs as nobody
            argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]
        else:
            env["QEMU_LOCKED_AUDIT"] = "false"
        # A blocking send would hang here (the timeout ends the test, failed).
        r = subprocess.run(argv, env=env, capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stderr == b""
        assert lock_free(img)  # it ran, locked, and let go
        if case == "no such socket":
            assert not os.path.lexists(path)  # nothing created in its place
        if sock.fileno() >= 0:
            assert b"qemu-locked" not in b"".join(received(sock))
            sock.close()
    finally:
        shutil.rmtree(top, ignore_errors=True)


# -- beside a running VM: the supervisor, the keeper ---------------------------------


@pytest.mark.qemu
def test_the_supervisor_logs_a_hot_plug_refused_and_a_lock_taken_and_released(
    syslog: Syslog, tmp_path: Path, holder
) -> None:
    QemuVM, qcow2 = test_supervisor.VM, test_supervisor.qcow2
    boot, held, free = (qcow2(tmp_path / f"{n}.qcow2") for n in ("boot", "held", "free"))
    holder_pid = holder(held)
    env = syslog.env()
    vm = QemuVM(tmp_path, "-drive", f"file={boot},if=virtio", name="sv",
                QEMU_LOCKED_AUDIT_SOCKET=syslog.socket)  # fmt: skip
    supervisor = vm.supervisor()
    try:
        assert "error" in vm.add(held, "held")
        assert "return" in vm.add(free, "free")
        assert "return" in vm.qmp.cmd("blockdev-del", **{"node-name": "free"})
        wait_for(lambda: lock_free(free), "released after blockdev-del", timeout=10)
        wait_for(lambda: [e["action"] for e in log(env, free)] == ["locked", "released"],
                 "the release in the log")  # fmt: skip
    finally:
        vm.quit()
    syslog.flush(supervisor)
    comm = Path(f"/proc/{holder_pid}/comm").read_text().strip()
    by_path: dict[str, list[dict[str, object]]] = {}
    for e in log(env):
        by_path.setdefault(str(e["path"]), []).append(fields(e))

    def line(action: str, path: str, origin: str, holder: str | None = None,
             detail: str | None = None) -> dict[str, object]:  # fmt: skip
        return {"action": action, "path": path, "key": f"file:{path}", "mode": "exclusive",
                "guest": "sv", "pid": vm.proc.pid, "host": HOST, "holder": holder,
                "origin": origin, "detail": detail}  # fmt: skip

    origin = f"-drive file={boot},if=virtio"
    assert by_path[boot] == [line("locked", boot, origin),
                             line("released", boot, origin, detail="the VM exited")]  # fmt: skip
    refusal = line(
        "refused", held, "opened after start", f"in use (writing) by pid {holder_pid} ({comm})"
    )
    assert by_path[held] and all(e == refusal for e in by_path[held]), (by_path[held], refusal)
    assert by_path[free] == [line("locked", free, "opened after start"),
                             line("released", free, "opened after start")]  # fmt: skip
    assert set(by_path) == {boot, held, free}


@pytest.mark.qemu
@pytest.mark.parametrize("supervisor", ["false", "true"])  # the keeper process, or the supervisor
def test_a_migrations_timeout_is_one_line_naming_the_holder(
    syslog: Syslog, tmp_path: Path, supervisor: str
) -> None:
    from guard_helpers import QEMU
    from test_migration import qemu

    if QEMU is None:
        skip_unless_ci("qemu-system-x86_64 (apt: qemu-system-x86)")
    image = test_supervisor.qcow2(tmp_path / "vm.qcow2")
    env = syslog.env(QEMU_LOCKED_EMULATOR=QEMU, QEMU_LOCKED_SUPERVISOR=supervisor,
                     QEMU_LOCKED_INCOMING_WAIT="3", QEMU_LOCKED_DOMAIN_LEASE="false")  # fmt: skip
    source = qemu(tmp_path, "holder", image, env)
    try:
        wait_for(lambda: not lock_free(image, exclusive=False), "the holder's lock")
        if supervisor == "true":  # its copies of the lock fds: not a holder once it has its name
            wait_for(lambda: any(procfs.comm(p) == procfs.SUPERVISOR_COMM
                                 for p in helpers(source.pid)), "the holder's supervisor")  # fmt: skip
        dst = qemu(tmp_path, "dst", image, env, "-incoming", "defer")
        # The keeper or supervisor, found while it waits (3 s): once it is gone, all
        # it would ever write is in the log (nothing for the lock it never took).
        beside: list[int] = []
        wait_for(lambda: bool(beside.extend(helpers(dst.pid)) or beside), "dst's helper")
        _out, err = dst.communicate(timeout=60)
        assert dst.returncode == -9, err
        syslog.flush(*beside)
    finally:
        source.kill()
        source.wait()
    timeouts = [fields(e) for e in log(env, image) if e["guest"] == "dst"]
    assert timeouts == [{
        "action": "timeout", "path": image, "key": f"file:{image}", "mode": "exclusive",
        "guest": "dst", "pid": dst.pid, "host": HOST,
        "holder": f"in use (writing) by pid {source.pid}, guest 'holder'", "origin": "incoming migration",
        "detail": "after 3 s of incoming migration; killing the VM (incoming_timeout_action = kill)",
    }]  # fmt: skip


def test_a_migrations_lock_taken_at_last_is_logged(syslog: Syslog, tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img")
    env = syslog.env(QEMU_LOCKED_DOMAIN_LEASE="false", QEMU_LOCKED_INCOMING_WAIT="600")
    source = started(VM(["-name", "guest=src", "-drive", f"file={img}"], env))
    dst = started(VM(["-name", "guest=dst", "-drive", f"file={img}", "-incoming", "defer"], env))
    try:
        source.kill()  # the source lets go: the keeper takes it for dst
        wait_for(lambda: len(log(env, img)) == 2, "the keeper's line")
    finally:
        dst.kill()
    common = {"path": img, "key": f"file:{img}", "mode": "exclusive", "host": HOST,
              "holder": None, "detail": None}  # fmt: skip
    assert [fields(e) for e in log(env, img)] == [
        {"action": "locked", **common, "guest": "src", "pid": source.proc.pid,
         "origin": f"-drive file={img}"},
        {"action": "locked", **common, "guest": "dst", "pid": dst.proc.pid,
         "origin": "incoming migration"},
    ]  # fmt: skip


# -- the line format, read back ------------------------------------------------------

# Any text a path can be: surrogate escapes (bytes that are not UTF-8) included.
_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",))
    | st.sampled_from([chr(0xDC00 + b) for b in range(0x80, 0x100)])
)


@settings(max_examples=300, deadline=None)
@given(_TEXT, _TEXT)
def test_any_value_reads_back_as_written(path: str, holder: str) -> None:
    from qemu_locked.model.audit import Event, datagram, format_event, parse_event

    ev = Event("refused", path or None, "file:/k", "exclusive", "g h", 7, "h", holder or None)
    line = format_event(ev)
    assert not any(c in line for c in "\n\r\0")  # one line, whatever a path holds
    assert parse_event(line) == ev
    datagram(ev, 1).decode("utf-8")  # valid UTF-8: journald keeps it a string


def test_since_forms() -> None:
    from qemu_locked.admin.auditlog import parse_since
    from qemu_locked.model.errors import UsageError

    now = 1_800_000_000.0
    assert [parse_since(t, now) for t in ("30s", "10min", "1h", "2d")] == [
        now - 30, now - 600, now - 3600, now - 2 * 86400
    ]  # fmt: skip
    when = datetime(2027, 1, 15, 8, tzinfo=UTC).timestamp()
    assert parse_since("2027-01-15T08:00:00+00:00", now) == when
    assert parse_since("2027-01-15 08:00:00Z", now) == when
    for bad in ("10", "10m", "soon", "1 y", ""):
        with pytest.raises(UsageError):
            parse_since(bad, now)


def test_a_journal_record_reads_as_its_message() -> None:
    """journalctl -o json: MESSAGE a string, or a list of bytes when not UTF-8
    (systemd's JSON export format); __REALTIME_TIMESTAMP in microseconds."""
    from qemu_locked.admin.auditlog import journal_record
    from qemu_locked.model.audit import Event

    line = "action=locked path=/x.img mode=shared pid=5"
    ev = journal_record({"MESSAGE": line, "__REALTIME_TIMESTAMP": "1800000000250000"})
    assert ev == Event("locked", "/x.img", mode="shared", pid=5, time=1_800_000_000.25)
    raw = {"MESSAGE": list(b"action=refused path=/\xff.img"), "__REALTIME_TIMESTAMP": "1"}
    assert journal_record(raw) == Event("refused", "/\udcff.img", time=1e-6)
    assert journal_record({"MESSAGE": "Started Session 3 of user root."}) is None


@pytest.mark.qemu
def test_the_monitor_guard_logs_its_refusal_and_locks(syslog: Syslog, tmp_path: Path) -> None:
    from guard_helpers import QEMU, Domain, guard_env
    from test_guard import add, image

    if QEMU is None:
        skip_unless_ci("qemu-system-x86_64 (apt: qemu-system-x86)")
    a, b, c = image(tmp_path, "a.qcow2"), image(tmp_path, "b.qcow2"), image(tmp_path, "c.qcow2")
    env = guard_env(QEMU_LOCKED_AUDIT_SOCKET=syslog.socket)
    one, two = Domain(tmp_path, "one", [a], env), Domain(tmp_path, "two", [b], env)
    try:
        q = one.qmp()
        two.qmp().close()
        # two's guard holds copies of its lock fds: once it has its name, it is not a holder
        wait_for(lambda: any(procfs.comm(p) == procfs.GUARD_COMM for p in helpers(two.proc.pid)),
                 "two's guard")  # fmt: skip
        assert "error" in q.cmd("blockdev-add", driver="file", filename=b,
                                **{"node-name": "x", "auto-read-only": True})  # fmt: skip
        assert add(q, c, "cf")["return"] == {}
        assert q.cmd("blockdev-del", **{"node-name": "cf"})["return"] == {}
        assert q.cmd("blockdev-del", **{"node-name": "cfs"})["return"] == {}
        wait_for(lambda: lock_free(c), "c released")
        wait_for(lambda: [e["action"] for e in log(syslog.env(), c)][-1:] == ["released"],
                 "the release in the log")  # fmt: skip
        guard = one.guard()
    finally:
        one.stop()
        two.stop()
    syslog.flush(guard)
    mine = [fields(e) for e in log(syslog.env()) if e["guest"] == "one"]
    common = {"key": None, "guest": "one", "pid": one.proc.pid, "host": HOST, "detail": None}
    start = {**common, "path": a, "key": f"file:{a}", "mode": "exclusive", "holder": None,
             "origin": "-blockdev s0"}  # fmt: skip
    assert mine == [
        {**start, "action": "locked"},  # by the wrapper
        {**common, "action": "refused", "path": b, "key": f"file:{b}", "mode": "shared",
         "holder": f"in use (writing) by pid {two.proc.pid}, guest 'two'", "origin": "blockdev-add"},
        # the file node (auto-read-only) first, then the writable qcow2 node on it
        {**common, "action": "locked", "path": c, "key": f"file:{c}", "mode": "shared",
         "holder": None, "origin": "blockdev-add cfs"},
        {**common, "action": "locked", "path": c, "key": f"file:{c}", "mode": "exclusive",
         "holder": None, "origin": "blockdev-add cf"},
        {**common, "action": "released", "path": c, "key": f"file:{c}", "mode": "exclusive",
         "holder": None, "origin": "blockdev-add cf"},
        {**start, "action": "released", "detail": "the VM exited"},  # by the guard
    ], mine  # fmt: skip


# -- journald ------------------------------------------------------------------------

# Runs in a mount namespace of its own: tmpfs over /run/systemd and /run/log and a
# journald.conf of ours bound over the host's, so the journald it starts is private
# (nothing of the host's journal read or written, no kernel log, no audit).  Then a
# start refused, and `qemu-lockctl log --json` as an operator would run it: no
# audit_file, journald found by its socket.
_IN_NAMESPACE = """
import json, os, subprocess, sys, time
conf, a_args, b_args = sys.argv[1], sys.argv[2], sys.argv[3]
for d in ("/run/systemd", "/run/log"):
    os.makedirs(d, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", d], check=True)
subprocess.run(["mount", "--bind", conf, "/etc/systemd/journald.conf"], check=True)
os.makedirs("/run/systemd/journal")
journald = subprocess.Popen(["/lib/systemd/systemd-journald"], stderr=subprocess.DEVNULL)
try:
    while not os.path.exists("/run/systemd/journal/dev-log"):
        time.sleep(0.02)
    a = subprocess.Popen(json.loads(a_args), stdout=subprocess.PIPE, text=True)
    a.stdout.readline()
    b = subprocess.run(json.loads(b_args), capture_output=True, text=True)
    for _ in range(500):  # journald writes as it reads: the refusal is there when listed
        r = subprocess.run([sys.argv[4], "log", "--json"], capture_output=True, text=True)
        if r.returncode != 0 or len(json.loads(r.stdout)) >= 2:
            break
        time.sleep(0.02)
    a.kill()
    since = [subprocess.run([sys.argv[4], "log", "--json", "--since", when], capture_output=True,
                            text=True).stdout for when in ("1h", "2099-01-01")]
    print(json.dumps({"a": a.pid, "b_rc": b.returncode, "rc": r.returncode, "out": r.stdout,
                      "err": r.stderr, "since": since}))
finally:
    journald.kill()
    journald.wait()
"""


def test_the_trail_reads_back_from_a_real_journald(tmp_path: Path) -> None:
    import sys

    journald = Path("/lib/systemd/systemd-journald")
    if os.geteuid() != 0 or not journald.exists() or not shutil.which("unshare"):
        skip_unless_ci("root, unshare and systemd-journald (apt: systemd)")
    conf = tmp_path / "journald.conf"
    conf.write_text("[Journal]\nStorage=volatile\nReadKMsg=no\nAudit=no\nForwardToSyslog=no\n"
                    "ForwardToWall=no\nRateLimitBurst=0\n")  # fmt: skip
    img = make_image(tmp_path / "d.img")
    env = base_env(QEMU_LOCKED_AUDIT_SOCKET="/run/systemd/journal/dev-log")
    a = [QEMU_LOCKED, "-name", "guest=a", "-drive", f"file={img}"]
    b = [QEMU_LOCKED, "-name", "guest=b", "-drive", f"file={img}"]
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _IN_NAMESPACE,
         str(conf), json.dumps(a), json.dumps(b), QEMU_LOCKCTL],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert (got["b_rc"], got["rc"], got["err"]) == (3, 0, ""), got
    entries = json.loads(got["out"])
    key = f"file:{os.path.realpath(img)}"
    assert [(e["action"], e["guest"], e["path"], e["key"], e["holder"]) for e in entries] == [
        ("locked", "a", img, key, None),
        ("refused", "b", img, key, f"in use (writing) by pid {got['a']}, guest 'a'"),
    ]
    assert [json.loads(out) for out in got["since"]] == [entries, []]  # journalctl --since=@T
    assert all(e["time"] and abs(datetime.fromisoformat(str(e["time"])) - datetime.now().astimezone())
               < timedelta(hours=1) for e in entries)  # fmt: skip


def test_a_keeper_that_cannot_take_the_lock_is_a_failed_line(
    syslog: Syslog, tmp_path: Path
) -> None:
    """ENOLCK from the lock call (NFSv3 without lockd), injected into the keeper only."""
    from fail_closed import injected

    img = make_image(tmp_path / "d.img")
    env = syslog.env(QEMU_LOCKED_DOMAIN_LEASE="false", QEMU_LOCKED_INCOMING_WAIT="600")
    source = started(VM(["-name", "guest=src", "-drive", f"file={img}"], env))
    try:
        dst = subprocess.Popen(injected("keeper", "ENOLCK", "-name", "guest=dst", "-drive", f"file={img}",
                                        "-incoming", "defer"),
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        _out, err = dst.communicate(timeout=60)
        assert dst.returncode == -9  # killed at once, long before incoming_wait
        wait_for(lambda: any(e["action"] == "failed" for e in log(env)), "the keeper's line")
        syslog.flush()
    finally:
        source.kill()
    (line,) = err.splitlines()  # the domain log's line, as the trail's detail
    assert "cannot take the lock (" in line and "No locks available" in line, line
    assert line.endswith("; killing the VM (incoming_timeout_action = kill)"), line
    assert [fields(e) for e in log(env) if e["guest"] == "dst"] == [{
        "action": "failed", "path": img, "key": f"file:{img}", "mode": "exclusive", "guest": "dst",
        "pid": dst.pid, "host": HOST, "holder": None, "origin": "incoming migration",
        "detail": line.removeprefix(f"qemu-locked: {img}: "),
    }]  # fmt: skip
