"""What the monitor guard says and tracks on its own: the command in flight
(whose reply it waits for), its one-line log entries, its own getfd/closefd
and what it makes of their answers."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.beside.guard.view import After


class Inflight:
    __slots__ = ("after", "gen", "hmp", "id", "mine")

    def __init__(self, cmd_id: object, gen: int, after: After | None, mine: bool,
                 hmp: bool) -> None:  # fmt: skip
        self.id = cmd_id
        self.gen = gen
        self.after = after
        self.mine = mine  # the guard's own command: its reply goes nowhere
        self.hmp = hmp


def oops(what: str, exc: Exception) -> str:
    """One line for the domain log (and the client): never a traceback."""
    from qemu_locked.beside.spawn import say
    from qemu_locked.model.errors import QemuLockedError

    text = (
        "; ".join(exc.lines())
        if isinstance(exc, QemuLockedError)
        else f"{type(exc).__name__}: {exc}"
    )
    say(f"monitor guard: {what}: {text}")
    return f"qemu-locked: monitor guard: {what}: {text}"


def own_command(cmd: str, name: str, fds: list[int], serial: int,
                gen: int) -> tuple[bytes, list[int], Inflight]:  # fmt: skip
    """The guard's own getfd/closefd: its text, the fds to pass and what is in flight."""
    import os

    cmd_id = f"qemu-locked-guard-{serial}"
    text = f'{{"execute": "{cmd}", "arguments": {{"fdname": "{name}"}}, "id": "{cmd_id}"}}'
    # the guard keeps its own copy of each fd: QEMU gets a duplicate
    dups = [os.dup(fd) for fd in fds]
    return text.encode(), dups, Inflight(cmd_id, gen, mine_done(cmd, name), True, False)


def mine_done(cmd: str, name: str) -> After:
    def after(ok: bool) -> None:
        if not ok:
            from qemu_locked.beside.spawn import say

            say(f"monitor guard: QEMU refused {cmd} {name}")

    return after
