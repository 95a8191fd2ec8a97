"""The monitor guard's steady state (guard/steady): plain commands relayed with
as little work as a bare relay, and everything else handed to the general loop
without a byte, an fd or the one-at-a-time order lost.  QEMU is played by the
test, so it can answer late, in pieces, or not at all."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from guard_helpers import QMP, FakeQemu, negotiated, played_qemu
from hypothesis import given, settings
from hypothesis import strategies as st

from qemu_locked.beside.guard.frame import OBJECT, SPACE, Splitter, plain
from qemu_locked.beside.guard.steady import WAIT_S, Verdicts, watched

QUERY = b'{"execute": "query-status", "id": 7}\r\n'


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"execute": "query-status", "id": "libvirt-12"}\r\n', True),
        (b'{"execute":"cont"}', True),
        (b'{"execute": "qom-get", "arguments": {"path": "/m", "property": "x"}}\r\n', True),
        (b'{"a": [1, {"b": [2, []]}], "c": "}{]["}\r\n', True),  # braces in strings: not counted
        (b"{}", True),
        (b'{"a": 1}{"b": 2}\r\n', False),  # two units
        (b'{"a": 1} {"b": 2}', False),
        (b'{"a": {}}, {}', False),
        (b"{}}{{}", False),  # below zero
        (b"{]}", False),  # a bracket below zero: QEMU's streamer resets
        (b"{][}", False),  # ...even if it comes back
        (b'{"a": [}', False),  # a bracket left open: QEMU waits for more
        (b'{"execute": "x}\r\n', False),  # an open string: QEMU waits for more
        (b'{"execute": "x\\"}"}\r\n', False),  # an escape: the long way
        (b"{'execute': 'query-status'}\r\n", False),
        (b' {"execute": "cont"}', False),  # leading whitespace: the long way
        (b'{"execute": "cont"', False),
        (b"[]", False),
        (b"", False),
    ],
)
def test_plain_is_one_object_for_certain(data: bytes, expected: bool) -> None:
    assert plain(data) is expected
    if data:  # the splitter, QEMU's way of cutting, agrees whenever plain says yes
        units = [u for u in Splitter().feed(data) if u.kind != SPACE]
        assert not expected or [u.kind for u in units] == [OBJECT]


_TOKENS = [b"{", b"}", b"[", b"]", b'"a"', b'"}"', b",", b":", b"1", b" ", b"\\", b"'", b'"']


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=12).map(b"".join))
def test_plain_never_says_yes_where_qemu_would_cut_differently(data: bytes) -> None:
    if plain(data):
        units = [u for u in Splitter().feed(data) if u.kind != SPACE]
        assert [u.kind for u in units] == [OBJECT] and units[0].data == data.rstrip()


def test_a_remembered_verdict_never_lets_more_through() -> None:
    verdicts = Verdicts()
    digits = bytes(range(0x30, 0x3A))
    samples = [b'{"execute": "query-status", "id": "libvirt-%d"}\r\n' % n for n in range(3)] + [
        b'{"execute": "blockdev-del", "id": 1}\r\n',
        b'{"execute": "bl0ockdev-del", "id": 1}\r\n',  # a watched word once digits go
        b'{"execute": "eject", "id": 2}\r\n',
        b'{"execute": "x", "arguments": {"id": 1}}\r\n',
        b'{"execute": "x", "arguments": {"id": 1}}{"execute": "y"}\r\n',
    ]
    for data in samples:
        verdict = verdicts.judge(data.translate(None, digits))
        assert not verdict or (plain(data) and not watched(data)), data
    assert len(verdicts.known) == 5  # libvirt's ids collapse; bl0ockdev is blockdev
    assert verdicts.judge(samples[4].translate(None, digits)) is False
    for n in range(2000):  # a client sending ever new commands: bounded
        verdicts.judge(b'{"execute": "q-%s"}' % (b"x" * (n % 997) + b"y" * (n // 997)))
    assert len(verdicts.known) <= 512


def _silent(sock: socket.socket, seconds: float = WAIT_S + 0.5) -> bool:
    """Does nothing arrive on this socket for a while (longer than the guard's
    wait for an answer in recv)?  Peeked: nothing is taken from it."""
    sock.settimeout(seconds)
    try:
        sock.recv(1 << 16, socket.MSG_PEEK)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(30)
    return False


def test_plain_traffic_is_relayed_byte_for_byte(tmp_path: Path) -> None:
    with played_qemu(tmp_path) as (_relay, qemu, path):
        client = negotiated(qemu, path)
        for _ in range(3):  # the steady loop's own path, several times over
            client.send(QUERY)
            assert qemu.raw() == QUERY
            reply = b'{"return": {"status": "running", "running": true}, "id": 7}\r\n'
            qemu.say(reply)
            assert client.file.readline() == reply
        nested = (
            b'{"execute": "qom-get", "arguments": {"path": "/m", "property": "t"}, "id": 3}\r\n'
        )
        client.send(nested)
        assert qemu.raw() == nested
        qemu.say(b'{"return": "x", "id": 3}\r\n')
        assert client.reply() == {"return": "x", "id": 3}
        # An answer in two writes, an event before it: each line whole, in order.
        client.send(QUERY)
        assert qemu.raw() == QUERY
        event = b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}\r\n'
        qemu.say(event)
        assert client.file.readline() == event
        qemu.say(b'{"return": {}')
        assert _silent(client.sock, 0.5)  # half a line is not passed on
        qemu.say(b', "id": 7}\r\n')
        assert client.file.readline() == b'{"return": {}, "id": 7}\r\n'
        client.close()


def test_a_long_answer_and_idle_events_arrive_whole(tmp_path: Path) -> None:
    """An answer longer than one read (query-qmp-schema is ~200 KiB) leaves the
    short loop half-read and is finished by the general one; events that come
    while nothing is in flight pass either way."""
    with played_qemu(tmp_path) as (_relay, qemu, path):
        client = negotiated(qemu, path)
        client.send(QUERY)
        assert qemu.raw() == QUERY
        long = b'{"return": "' + b"s" * (200 << 10) + b'", "id": 7}\r\n'
        qemu.say(long)
        assert client.file.readline() == long
        for name in (b"RTC_CHANGE", b"DEVICE_DELETED"):
            event = b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "%s"}\r\n' % name
            qemu.say(event)
            assert client.file.readline() == event
        client.send(QUERY)  # plain traffic goes on after both
        assert qemu.raw() == QUERY
        qemu.say(b'{"return": {}, "id": 7}\r\n')
        assert client.reply() == {"return": {}, "id": 7}
        client.close()


def test_commands_still_wait_their_turn(tmp_path: Path) -> None:
    with played_qemu(tmp_path) as (_relay, qemu, path):
        client = negotiated(qemu, path)
        client.send(QUERY)
        client.send(b'{"execute": "query-name", "id": 8}\r\n')  # before the first is answered
        assert qemu.raw() == QUERY
        assert _silent(qemu.sock)
        qemu.say(b'{"return": {}, "id": 7}\r\n')
        assert qemu.raw() == b'{"execute": "query-name", "id": 8}\r\n'
        qemu.say(b'{"return": {}, "id": 8}\r\n')
        assert client.reply() == {"return": {}, "id": 7}
        assert client.reply() == {"return": {}, "id": 8}
        client.send(b'{"execute": "a", "id": 9}{"execute": "b", "id": 10}\r\n')  # one write
        first, _ = qemu.command()
        assert first == {"execute": "a", "id": 9}
        assert _silent(qemu.sock)
        qemu.answer(first)
        second, _ = qemu.command()
        assert second == {"execute": "b", "id": 10}
        qemu.answer(second)
        assert [client.reply(), client.reply()] == [
            {"return": {}, "id": 9},
            {"return": {}, "id": 10},
        ]
        client.close()


def test_a_slow_answer_does_not_keep_a_reconnecting_client_waiting(tmp_path: Path) -> None:
    """The answer to a plain command is awaited in recv, but only for WAIT_S:
    after that the guard polls again, so a client that gave up and a new one
    (libvirtd restarted) are seen while QEMU still works on the command.  The new
    client's commands then wait for that answer, as they would in QEMU itself."""
    with played_qemu(tmp_path) as (_relay, qemu, path):
        client = negotiated(qemu, path)
        client.send(QUERY)
        assert qemu.raw() == QUERY
        client.close()
        again = QMP(path)  # reads the greeting: the guard took the new client
        assert "QMP" in again.greeting
        again.send(b'{"execute": "qmp_capabilities", "id": "c"}\r\n')
        again.send(b'{"execute": "query-name", "id": "n"}\r\n')
        assert _silent(again.sock) and _silent(qemu.sock)  # both wait for QEMU's answer
        qemu.say(b'{"return": {}, "id": 7}\r\n')  # the old client's answer: not for this one
        assert again.reply() == {"return": {}, "id": "c"}  # answered by the guard itself
        assert qemu.raw() == b'{"execute": "query-name", "id": "n"}\r\n'
        qemu.say(b'{"return": {"name": "vm"}, "id": "n"}\r\n')
        assert again.reply() == {"return": {"name": "vm"}, "id": "n"}
        again.send(QUERY)
        assert qemu.raw() == QUERY
        # Left unanswered: the VM's exit still ends the relay (played_qemu checks).


def test_an_fd_with_a_plain_command_reaches_qemu_with_it(tmp_path: Path) -> None:
    target = tmp_path / "passed"
    target.write_bytes(b"x")
    with played_qemu(tmp_path) as (_relay, qemu, path):
        client = negotiated(qemu, path)
        fd = os.open(target, os.O_RDONLY)
        try:
            client.send(QUERY, [fd])
        finally:
            os.close(fd)
        cmd, fds = qemu.command()
        assert cmd == json.loads(QUERY) and len(fds) == 1
        assert os.fstat(fds[0]).st_ino == target.stat().st_ino
        os.close(fds[0])
        qemu.answer(cmd)
        assert client.reply() == {"return": {}, "id": 7}
        client.close()


def test_a_client_gone_before_the_answer_leaves_the_relay_working(tmp_path: Path) -> None:
    with played_qemu(tmp_path) as (_relay, qemu, path):
        client = negotiated(qemu, path)
        client.send(QUERY)
        assert qemu.raw() == QUERY
        client.sock.shutdown(socket.SHUT_RDWR)
        client.close()
        qemu.say(b'{"return": {}, "id": 7}\r\n' * 2)  # one answer, one stray: nowhere to go
        again = _negotiated_again(qemu, path)
        again.send(QUERY)
        assert qemu.raw() == QUERY
        qemu.say(b'{"return": {}, "id": 7}\r\n')
        assert again.reply() == {"return": {}, "id": 7}
        again.close()


def _negotiated_again(qemu: FakeQemu, path: str) -> QMP:
    """A later client: QEMU's session is negotiated already, the guard answers."""
    client = QMP(path)
    client.send(b'{"execute": "qmp_capabilities", "id": 1}\r\n')
    assert client.reply() == {"return": {}, "id": 1}
    return client
