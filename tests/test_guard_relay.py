"""The monitor guard's relay across reconnects and odd clients, with QEMU played
by the test (guard_helpers.played_qemu): what belongs to one client never
reaches the next, and nothing a client sends can stop the relay (which would
stop the VM)."""

from __future__ import annotations

from pathlib import Path

import pytest
from guard_helpers import QMP, negotiated, played_qemu, policy_for

from qemu_locked.beside.guard.steady import Verdicts

QUERY = b'{"execute": "query-status", "id": 7}\r\n'


def test_an_id_that_is_not_unicode_does_not_stop_the_relay(tmp_path: Path) -> None:
    with played_qemu(tmp_path) as (_relay, qemu, path):
        first = negotiated(qemu, path)
        first.close()
        again = QMP(path)  # the guard answers this one itself, echoing the id
        again.send(b'{"execute": "qmp_capabilities", "id": "\\udcff\xff"}\r\n')
        reply = again.file.readline()
        assert b'"return": {}' in reply
        again.send(QUERY)
        assert qemu.raw() == QUERY
        qemu.say(b'{"return": {}, "id": 7}\r\n')
        assert again.reply() == {"return": {}, "id": 7}
        again.close()


def test_capabilities_answered_for_one_client_do_not_negotiate_the_next(tmp_path: Path) -> None:
    with played_qemu(tmp_path) as (_relay, qemu, path):
        first = QMP(path)
        first.send(b'{"execute": "qmp_capabilities", "id": 1}\r\n')
        cmd, _ = qemu.command()
        first.close()  # gone before QEMU answered
        second = QMP(path)
        qemu.answer(cmd)
        second.send(b'{"execute": "query-status", "id": 2}\r\n')
        assert second.reply()["error"]["class"] == "CommandNotFound"  # type: ignore[index]
        second.send(b'{"execute": "qmp_capabilities", "id": 3}\r\n')
        assert second.reply() == {"return": {}, "id": 3}  # by the guard: QEMU's is done
        second.close()


def test_the_rest_of_a_long_answer_does_not_reach_the_next_client(tmp_path: Path) -> None:
    with played_qemu(tmp_path) as (_relay, qemu, path):
        first = negotiated(qemu, path)
        first.send(QUERY)
        assert qemu.raw() == QUERY
        qemu.say(b'{"return": "' + b"x" * (2 << 20))  # over 1 MiB, and not yet whole
        first.sock.close()
        first.file.close()
        second = QMP(path)
        qemu.say(b'TAIL-OF-OLD-ANSWER"}\r\n')
        second.send(b'{"execute": "qmp_capabilities", "id": 2}\r\n')
        assert second.file.readline() == b'{"return": {}, "id": 2}\r\n'
        second.close()


def test_digits_outside_the_object_are_not_a_plain_command() -> None:
    """A remembered verdict ignores digits, which only holds inside the object:
    a number before or after it is a unit of its own to QEMU."""
    verdicts = Verdicts()
    assert verdicts.passes(b'{"execute": "query-status", "id": 5}\r\n')
    for data in (b'5{"execute": "query-status"}\r\n', b'{"execute": "query-status"}7\r\n',
                 b'{"execute": "query-status"}\r\n7\r\n'):  # fmt: skip
        assert not verdicts.passes(data), data


def test_a_due_release_happens_under_steady_traffic(tmp_path: Path) -> None:
    """A disk QEMU let go of is released within a few seconds even while the
    client keeps the monitor busy (libvirt polls balloon stats every second)."""
    import json
    import os
    import time

    from conftest import lock_free

    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 65536)
    policy = policy_for(tmp_path, "busy")
    fds: list[int] = []
    with played_qemu(tmp_path, policy) as (_relay, qemu, path):
        client = negotiated(qemu, path)
        client.send(json.dumps({"execute": "blockdev-add", "id": 2, "arguments": {
            "driver": "file", "filename": str(disk), "node-name": "n"}}).encode())  # fmt: skip
        getfd, fds = qemu.command()
        qemu.answer(getfd)
        add, _ = qemu.command()
        own = os.open(disk, os.O_RDWR)  # QEMU opens the image
        qemu.answer(add)
        assert client.reply() == {"return": {}, "id": 2}
        client.send(b'{"execute": "blockdev-del", "id": 3, "arguments": {"node-name": "n"}}')
        dele, _ = qemu.command()
        qemu.answer(dele)  # done, but QEMU still has it open: the release is due
        assert client.reply() == {"return": {}, "id": 3}
        os.close(own)
        released = False
        end = time.monotonic() + 5
        while time.monotonic() < end and not released:
            client.send(QUERY)  # a query every 0.2 s: poll never times out
            cmd, _ = qemu.command()
            released = cmd["execute"] == "closefd"
            qemu.answer(cmd)
            if not released:
                assert client.reply() == {"return": {}, "id": 7}
                time.sleep(0.2)
        assert released and lock_free(str(disk))
        client.close()
    for fd in fds:
        os.close(fd)


def test_a_hot_plugged_qcow2s_data_file_is_locked_with_it(tmp_path: Path) -> None:
    """QEMU opens the external data file a qcow2 header names (and writes the
    guest's data there): locked like the image, as at start (test_data_file)."""
    import json
    import os

    from conftest import lock_free
    from fail_closed import qemu_img

    image, data = tmp_path / "d.qcow2", tmp_path / "d.raw"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", str(image), "1M")
    policy = policy_for(tmp_path, "data")
    fds: list[int] = []
    with played_qemu(tmp_path, policy) as (_relay, qemu, path):
        client = negotiated(qemu, path)
        for i, args in enumerate([  # as libvirt adds a disk
            {"driver": "file", "filename": str(image), "node-name": "s", "auto-read-only": True},
            {"node-name": "f", "read-only": False, "driver": "qcow2", "file": "s", "backing": None},
        ], start=2):  # fmt: skip
            client.send(
                json.dumps({"execute": "blockdev-add", "id": i, "arguments": args}).encode()
            )
            sent = qemu.next_from_client(fds)
            assert sent["execute"] == "blockdev-add"
            qemu.answer(sent)
            assert client.reply() == {"return": {}, "id": i}
        assert not lock_free(str(data), exclusive=False)  # the guest writes there
        client.send(b'{"execute": "blockdev-del", "id": 9, "arguments": {"node-name": "f"}}')
        dele, _ = qemu.command()
        qemu.answer(dele)
        assert client.reply() == {"return": {}, "id": 9}
        client.close()
    for fd in fds:
        os.close(fd)


def test_a_refused_command_keeps_nothing_it_took(tmp_path: Path) -> None:
    """A media change refused halfway (its image is free, its backing file is
    missing) lets go of the image again: only what the command had taken."""
    import json
    import os
    import time

    from conftest import lock_free
    from fail_closed import qemu_img

    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(tmp_path / "gone.qcow2"),
             "-F", "qcow2", str(top), "1M")  # fmt: skip
    policy = policy_for(tmp_path, "refused")
    fds: list[int] = []
    with played_qemu(tmp_path, policy) as (_relay, qemu, path):
        client = negotiated(qemu, path)
        client.send(json.dumps({"execute": "blockdev-change-medium", "id": 2, "arguments": {
            "id": "cd0", "filename": str(top), "format": "qcow2"}}).encode())  # fmt: skip
        refused = client.reply()
        assert "gone.qcow2" in refused["error"]["desc"]  # type: ignore[index]
        end = time.monotonic() + 5
        while time.monotonic() < end and not lock_free(str(top)):
            client.send(QUERY)  # the guard's own getfd/closefd come first, answered here
            cmd = qemu.next_from_client(fds)
            qemu.answer(cmd)
            assert client.reply() == {"return": {}, "id": 7}
            time.sleep(0.2)
        assert lock_free(str(top))
        client.close()
    for fd in fds:
        os.close(fd)


def test_an_upgrade_that_loses_the_lock_is_a_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shared to exclusive may need the lock taken anew; if another process
    takes it in that gap, neither mode can be had again: 'shared for now'
    (defer_ok) must not pass for a disk with no lock at all."""
    import os

    from conftest import lock_free

    from qemu_locked.beside.locks import Locks, Refused
    from qemu_locked.model.config import Config
    from qemu_locked.model.plan import EXCLUSIVE, SHARED, Plan

    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 4096)
    locks = Locks(Config(lockspace_dir=str(tmp_path / "none")), Plan((), (), "up", None),
                  os.getpid())  # fmt: skip
    held = locks.want(str(disk), SHARED, "a", "test")
    assert held.fds and not lock_free(str(disk))

    def taken_meanwhile(self: Locks, lock: object, mode: str) -> None:
        raise Refused(f"qemu-locked: {disk} is locked (exclusive) by someone else")

    monkeypatch.setattr(Locks, "_acquire", taken_meanwhile)  # the race's outcome, injected
    with pytest.raises(Refused):
        locks.want(str(disk), EXCLUSIVE, "b", "test", defer_ok=True)
    assert not held.fds and held.key not in locks.by_key  # the next want takes it anew
