"""The monitor guard with the real QEMU, started by hand the way libvirt starts it
(a listening monitor socket passed as fd N), and its QMP framing on its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU_LOCKED, lock_free
from guard_helpers import QEMU, QMP, Domain, guard_env, negotiated, played_qemu, policy_for

from qemu_locked.beside.guard.frame import (
    HEAD,
    OBJECT,
    OTHER,
    OVERSIZE,
    PIECE,
    SPACE,
    Lines,
    Splitter,
)
from qemu_locked.lock import procfs

QEMU_IMG = shutil.which("qemu-img")

needs_qemu = pytest.mark.skipif(
    (QEMU is None or QEMU_IMG is None) and os.environ.get("CI") != "true",
    reason="qemu-system-x86_64 / qemu-img not installed (make test installs them)",
)


# -- framing ------------------------------------------------------------------------

STREAM = (
    b'{"execute": "qmp_capabilities", "id": "a"}\r\n'
    b'{"x": "}\\"\'", "y": [1, {"z": "]"}]}  [1] 12 "s" }'
    b"{'execute': 'query-status'}\r\n"
)


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, len(STREAM)])
def test_splitter_cuts_where_qemu_does_whatever_the_chunks(chunk: int) -> None:
    split = Splitter(limit=1 << 10)
    units = []
    for i in range(0, len(STREAM), chunk):
        units += split.feed(STREAM[i : i + chunk], [100 + i] if i == 0 else None)
    assert b"".join(u.data for u in units) == STREAM  # not a byte changed or lost
    merged: list[tuple[str, bytes]] = []
    for u in units:
        if merged and u.kind == SPACE and merged[-1][0] == SPACE:
            merged[-1] = (SPACE, merged[-1][1] + u.data)
        else:
            merged.append((u.kind, u.data))
    kinds = [k for k, _d in merged if k != SPACE]
    assert kinds == [OBJECT, OBJECT, OBJECT, OTHER, OTHER, OTHER, OBJECT]
    assert units[0].fds == [100] and all(not u.fds for u in units[1:])


def test_splitter_bounds_what_it_keeps() -> None:
    huge = b'{"execute": "blockdev-add", "arguments": {"x": "' + b"a" * (3 << 20) + b'"}}'
    dropped = Splitter(limit=1 << 20)
    units = dropped.feed(huge)
    assert [u.kind for u in units] == [OVERSIZE] and units[0].data == b""
    assert dropped.pending() == 0
    lines = Lines(limit=1 << 20)  # QEMU's side: streamed on, never kept whole
    reply = b'{"return": "' + b"a" * (3 << 20) + b'"}\r\n{"return": {}}\r\n'
    units = []
    for i in range(0, len(reply), 1 << 16):
        units += lines.feed(reply[i : i + (1 << 16)])
        assert lines.pending() <= 1 << 20
    assert [u.kind for u in units if u.kind != PIECE] == [HEAD, OBJECT]
    assert units[-1].data == b'{"return": {}}\r\n'
    assert b"".join(u.data for u in units) == reply


# -- the guard with the real QEMU -----------------------------------------------------


@pytest.fixture
def domains(tmp_path: Path) -> Iterator[list[Domain]]:
    made: list[Domain] = []
    yield made
    for d in made:
        d.stop()


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has closed every fd)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def image(tmp: Path, name: str) -> str:
    path = str(tmp / name)
    subprocess.run([str(QEMU_IMG), "create", "-q", "-f", "qcow2", path, "16M"], check=True)
    return path


def add(q: QMP, path: str, node: str) -> dict[str, object]:
    r = q.cmd("blockdev-add", driver="file", filename=path,
              **{"node-name": node + "s", "auto-read-only": True})  # fmt: skip
    if "error" in r:
        return r
    return q.cmd("blockdev-add", driver="qcow2", file=node + "s", backing=None,
                 **{"node-name": node, "read-only": False})  # fmt: skip


@needs_qemu
def test_hot_plug_is_refused_naming_the_holder_and_blockdev_del_frees(
    tmp_path: Path, domains: list[Domain]
) -> None:
    a, b, c = image(tmp_path, "a.qcow2"), image(tmp_path, "b.qcow2"), image(tmp_path, "c.qcow2")
    one = Domain(tmp_path, "one", [a])
    two = Domain(tmp_path, "two", [b])
    domains += [one, two]
    q = one.qmp()
    r = q.cmd(
        "blockdev-add", driver="file", filename=b, **{"node-name": "x", "auto-read-only": True}
    )
    assert r["error"] == {  # type: ignore[comparison-overlap]
        "class": "GenericError",
        "desc": f"qemu-locked: cannot read {b}: in use (writing) by pid {two.proc.pid}, guest 'two'",
    }
    assert add(q, c, "cf")["return"] == {}
    assert not lock_free(c, exclusive=False)
    # the lock is QEMU's (handed over with getfd): it outlives the guard
    guard = one.guard()
    os.kill(guard, 9)
    while running(guard):  # until the kernel has taken it down
        time.sleep(0.01)
    q.close()
    assert one.proc.poll() is None and not lock_free(c, exclusive=False)
    one.stop()
    assert lock_free(c) and lock_free(a)
    q2 = two.qmp()
    assert add(q2, c, "cf")["return"] == {}
    assert q2.cmd("blockdev-del", **{"node-name": "cf"})["return"] == {}
    assert not lock_free(c)  # the file node still has it open
    assert q2.cmd("blockdev-del", **{"node-name": "cfs"})["return"] == {}
    assert lock_free(c)


@needs_qemu
def test_malformed_and_huge_input_is_survived_and_answered(
    tmp_path: Path, domains: list[Domain]
) -> None:
    one = Domain(tmp_path, "mal", [])
    domains.append(one)
    q = one.qmp()
    q.send(b"}}} nonsense [1,2] \r\n")
    q.send(b'{"execute": "blockdev-add", "arguments": {"filename": "' + b"x" * (2 << 20) + b'"}}')
    q.send(b'{"execute": "blockdev\\u002dadd", "arguments": }\r\n')  # unreadable, names a command
    seen = [str(q.reply()) for _ in range(2)]
    while not all(any(w in r for r in seen) for w in ("over 1 MiB", "could not read this")):
        seen.append(str(q.reply()))  # QEMU's own parse errors for the nonsense come too
        assert len(seen) < 20, seen
    assert q.cmd("query-status")["return"]["status"] == "prelaunch"  # type: ignore[index]
    with open(f"/proc/{one.guard()}/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    assert rss_kib < 32 << 10, rss_kib


@needs_qemu
def test_a_client_that_reads_no_answers_is_held_back_not_buffered(
    tmp_path: Path, domains: list[Domain]
) -> None:
    one = Domain(tmp_path, "slow", [])
    domains.append(one)
    q = one.qmp()
    q.sock.setblocking(False)
    line = b'{"execute": "closefd", "arguments": {"fdname": "qemu-locked-1"}}\r\n' * 256
    sent = 0
    try:
        while sent < 256 << 20:  # answered by the guard itself, never read by us
            sent += q.sock.send(line)
    except BlockingIOError:
        pass  # the guard stopped reading: back-pressure, not an ever-growing buffer
    assert sent < 256 << 20
    with open(f"/proc/{one.guard()}/status") as f:
        rss_kib = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    assert rss_kib < 64 << 10, rss_kib
    q.sock.setblocking(True)
    q.close()
    q = QMP(one.path)  # the next session is served at once
    assert q.cmd("qmp_capabilities")["return"] == {}
    assert q.cmd("query-status")["return"]["status"] == "prelaunch"  # type: ignore[index]


@needs_qemu
def test_reconnect_gets_the_greeting_and_a_local_capabilities_answer(
    tmp_path: Path, domains: list[Domain]
) -> None:
    one = Domain(tmp_path, "re", [])
    domains.append(one)
    q = one.qmp()
    greeting = q.greeting
    q.close()
    q = QMP(one.path)  # what libvirtd does after a restart
    assert q.greeting == greeting
    assert q.cmd("query-status")["error"]["class"] == "CommandNotFound"  # type: ignore[index]
    assert q.cmd("qmp_capabilities") == {"return": {}, "id": "t2"}
    assert q.cmd("query-status")["return"]["status"] == "prelaunch"  # type: ignore[index]


@needs_qemu
def test_fds_pass_through_with_their_command(tmp_path: Path, domains: list[Domain]) -> None:
    one = Domain(tmp_path, "fd", [])
    domains.append(one)
    q = one.qmp()
    r, w = os.pipe()
    assert q.cmd("add-fd", fds=[r], **{"fdset-id": 7})["return"]["fdset-id"] == 7  # type: ignore[index]
    assert q.cmd("getfd", fds=[w], fdname="mine")["return"] == {}
    inode = {os.fstat(r).st_ino, os.fstat(w).st_ino}
    links = {
        os.readlink(f"/proc/{one.proc.pid}/fd/{fd}")
        for fd in os.listdir(f"/proc/{one.proc.pid}/fd")
    }
    assert {f"pipe:[{i}]" for i in inode} <= links
    assert "reserved" in str(q.cmd("getfd", fds=[w], fdname="qemu-locked-9"))


@needs_qemu
def test_a_monitor_given_by_path_is_not_guarded(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        [QEMU_LOCKED, "-S", "-nodefaults", "-machine", "none", "-display", "none",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        env=guard_env(), stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        q = QMP(str(sock))
        assert "QMP" in q.greeting
        q.close()
        assert not [p for p in procfs.pids() if procfs.comm(p) == procfs.GUARD_COMM
                    and f"{sock}".encode() in Path(f"/proc/{p}/cmdline").read_bytes()]  # fmt: skip
    finally:
        proc.kill()
        proc.wait()


# -- a hostile QEMU -----------------------------------------------------------------


def test_a_hostile_qemu_cannot_make_the_guard_let_go_or_fall_over(tmp_path: Path) -> None:

    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 65536)
    policy = policy_for(tmp_path, "hostile")
    fds: list[int] = []
    with played_qemu(tmp_path, policy) as (_relay, qemu, path):
        client = QMP(path)
        client.send(b'{"execute": "qmp_capabilities", "id": 1}\r\n')
        cmd, _fds = qemu.command()
        qemu.answer(cmd)
        assert client.reply() == {"return": {}, "id": 1}
        client.send(json.dumps({"execute": "blockdev-add", "id": 2, "arguments": {
            "driver": "file", "filename": str(disk), "node-name": "n", "read-only": False,
        }}).encode())  # fmt: skip
        getfd, fds = qemu.command()  # the lock fd comes first, for QEMU to keep
        assert getfd["execute"] == "getfd" and len(fds) == 1
        qemu.answer(getfd)
        add, _ = qemu.command()
        assert add["execute"] == "blockdev-add"
        own = os.open(disk, os.O_RDWR)  # QEMU opens the image itself
        qemu.answer(add)
        assert client.reply() == {"return": {}, "id": 2}
        assert not lock_free(str(disk), exclusive=False)
        # Lies, garbage and a 3 MiB line: passed on, and nothing is let go.
        huge = b'{"return": "' + b"x" * (3 << 20) + b'"}\r\n'
        qemu.say(b'{"timestamp": {}, "event": "DEVICE_DELETED", "data": {"device": "n"}}\r\n')
        qemu.say(b"}{][ not json at all\r\n" + huge)
        client.send(b'{"execute": "blockdev-del", "id": 3, "arguments": {"node-name": "n"}}')
        seen = [client.file.readline() for _ in range(3)]
        assert seen[1] == b"}{][ not json at all\r\n" and seen[2] == huge
        dele, _ = qemu.command()
        assert dele["execute"] == "blockdev-del"
        qemu.answer(dele)  # "done" - but QEMU still has the image open
        assert client.reply() == {"return": {}, "id": 3}
        assert not lock_free(str(disk), exclusive=False)
        os.close(own)  # now it really lets go: the guard's next look frees it
        closefd, _ = qemu.command()
        assert closefd["execute"] == "closefd"
        qemu.answer(closefd)
        assert lock_free(str(disk))
        client.close()
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize(
    "text",
    [
        b'{"execute": "query-status", "id": "libvirt-1"}\r\n',
        b'{"execute": "qom-list", "arguments": {"path": "/machine"}, "id": 2}\r\n',
        b'{"execute": "x", "id": "a}{b"}\r\n',
        b"{'execute': 'query-status'}\r\n",
        b'{"execute": "x", "id": "\\"}"}\n',
        b'{"a": 1}{"b": 2}\r\n',
        b'{"a": [1, 2]}',
        b'{"execute": "x"',
    ],
)
def test_splitter_fast_path_agrees_with_the_byte_by_byte_walk(text: bytes) -> None:
    whole = [(u.kind, u.data) for u in Splitter().feed(text)]
    slow = Splitter()
    bytewise = [(u.kind, u.data) for i in range(len(text)) for u in slow.feed(text[i : i + 1])]
    merged: list[tuple[str, bytes]] = []
    for kind, data in bytewise:  # whitespace comes a byte at a time here
        if merged and kind == SPACE and merged[-1][0] == SPACE:
            merged[-1] = (SPACE, merged[-1][1] + data)
        else:
            merged.append((kind, data))
    assert whole == merged


def test_every_watched_command_is_caught_before_the_unparsed_pass() -> None:
    """Commands the policy watches must never take the relay's parse-free path."""
    from qemu_locked.beside.guard.policy import _HANDLERS, _TX
    from qemu_locked.beside.guard.steady import GUARDED

    for name in [*_HANDLERS, *_TX]:
        raw = b'{"execute": "%s", "id": 1}' % name.encode()
        assert any(word in raw for word in GUARDED), name


@pytest.mark.parametrize(("driver", "writer"), [("scsi-hd", True), ("scsi-block", True),
                                                ("scsi-cd", False)])  # fmt: skip
def test_a_hot_plugged_device_locks_as_at_start(tmp_path: Path, driver: str, writer: bool) -> None:
    """device_add makes the disk exclusive for a device that writes, as the start
    path does for -device: scsi-block (a LUN, <disk device='lun'>) writes; only
    the cd devices do not."""

    disk = tmp_path / "lun.img"
    disk.write_bytes(b"\0" * 65536)
    policy = policy_for(tmp_path, "lun")
    fds: list[int] = []
    with played_qemu(tmp_path, policy) as (_relay, qemu, path):
        client = negotiated(qemu, path)
        client.send(json.dumps({"execute": "blockdev-add", "id": 2, "arguments": {
            "driver": "file", "filename": str(disk), "node-name": "n", "auto-read-only": True,
        }}).encode())  # fmt: skip
        getfd, got = qemu.command()
        fds += got
        qemu.answer(getfd)
        add, _ = qemu.command()
        qemu.answer(add)
        assert client.reply() == {"return": {}, "id": 2}
        assert lock_free(str(disk), exclusive=False) and not lock_free(str(disk))  # shared
        client.send(json.dumps({"execute": "device_add", "id": 3, "arguments": {
            "driver": driver, "drive": "n", "id": "d"}}).encode())  # fmt: skip
        sent = qemu.next_from_client(fds)  # after the lock fds, if the mode changed
        assert sent["execute"] == "device_add"
        assert lock_free(str(disk), exclusive=False) is not writer  # taken before forwarding
        qemu.answer(sent)
        assert client.reply() == {"return": {}, "id": 3}
        client.close()
    for fd in fds:
        os.close(fd)
