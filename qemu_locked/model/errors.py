"""One error hierarchy.  Every error carries the facts and its exit code, and
renders as a single line; the front ends add their ``qemu-locked: `` or
``qemu-lockctl: `` prefix."""

from __future__ import annotations

# Exit codes (documented in docs/exit-codes.md).
EXIT_OK = 0
EXIT_CONFLICT = 1  # qemu-lockctl check: would be refused
# qemu-locked, where QEMU itself would refuse the command line (bad option or value,
# missing or unopenable image): QEMU exits 1 there, and scripts expect what it does.
EXIT_QEMU_REJECTS = 1
EXIT_USAGE = 2  # bad argument, bad config, bad XML
EXIT_LOCKED = 3  # a disk (or domain lease) is held by someone else
# a disk (for `log`, the system log) cannot be opened: missing, wrong type, permission
EXIT_DISK = 4
EXIT_BACKEND = 5  # the lock machinery itself failed (no OFD support, lockspace I/O)
EXIT_DENIED = 6  # the host's security policy (AppArmor, SELinux) refused an open or a lock
EXIT_INTERNAL = 70  # a bug in qemu-locked (EX_SOFTWARE); still one line, no traceback
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


class QemuLockedError(Exception):
    exit_code = EXIT_BACKEND
    # The drop-in's status: QEMU's own where QEMU would fail the same way.
    drop_in_exit_code: int | None = None

    def wrapper_exit_code(self) -> int:
        return self.exit_code if self.drop_in_exit_code is None else self.drop_in_exit_code

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def lines(self) -> list[str]:
        # Paths may hold newlines; libvirt shows stderr verbatim, so one fact stays one line.
        return [self.message.replace("\n", "\\n")]


class UsageError(QemuLockedError):
    exit_code = EXIT_USAGE


class ArgumentError(UsageError):
    """A QEMU argument we cannot understand well enough to lock safely."""

    drop_in_exit_code = EXIT_QEMU_REJECTS

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


class ConfigError(UsageError):
    def __init__(self, source: str, key: str | None, message: str) -> None:
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")
        self.source = source
        self.key = key


class DiskError(QemuLockedError):
    exit_code = EXIT_DISK
    drop_in_exit_code = EXIT_QEMU_REJECTS

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


# (resource, mode this VM wants, "(mode) by <holders>")
Conflict = tuple[str, str, str]


class LockedError(QemuLockedError):
    """Held by another process (or host).  One line per conflicting resource."""

    exit_code = EXIT_LOCKED

    def __init__(self, conflicts: list[Conflict]) -> None:
        self.conflicts = conflicts
        # resource -> its disk's role, where the plan is known: tells "share" from "read"
        self.roles: dict[str, str] = {}
        super().__init__(self._line(*conflicts[0]))

    def _line(self, resource: str, wanted: str, holders: str) -> str:
        from qemu_locked.model import words

        return words.refusal(resource, wanted, holders, role=self.roles.get(resource, ""))

    def lines(self) -> list[str]:
        return [self._line(*c).replace("\n", "\\n") for c in self.conflicts]


class BackendError(QemuLockedError):
    exit_code = EXIT_BACKEND


class PolicyDenied(QemuLockedError):
    """An open, a lock or a /proc read that file permissions allow was refused all
    the same: a security module (AppArmor, SELinux) confines this process.  Never
    reported as a holder: nobody holds anything, and nothing is held behind it."""

    exit_code = EXIT_DENIED

    def __init__(self, path: str, action: str, modules: str) -> None:
        super().__init__(
            f"{path}: {action} denied by the host's security policy ({modules}); "
            "`qemu-lockctl doctor` names the fix"
        )
        self.path = path
        self.action = action


class LogUnreadable(QemuLockedError):
    """qemu-lockctl log: the system log holding the audit trail cannot be read."""

    exit_code = EXIT_DISK


class InternalError(QemuLockedError):
    exit_code = EXIT_INTERNAL


class EmulatorNotFound(QemuLockedError):
    exit_code = EXIT_NOT_FOUND


class EmulatorNotExecutable(QemuLockedError):
    exit_code = EXIT_NOT_EXECUTABLE
