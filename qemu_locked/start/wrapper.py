"""qemu-locked: the drop-in emulator.  argv -> plan -> locks -> exec QEMU.

Every argument belongs to QEMU and is passed on unchanged, in order.  Our
own settings come from the config file and QEMU_LOCKED_* variables.  This
module runs before every VM start: it imports only what the start uses, and
nothing it does not (no typer, portalocker, lxml, json, re, dataclasses).
"""

from __future__ import annotations

import os
import sys

from qemu_locked.model import config as _config
from qemu_locked.model.errors import ArgumentError, LockedError, QemuLockedError
from qemu_locked.parse.argv import USER_CONFIG, parse_argv
from qemu_locked.start import emulator as _emulator

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from qemu_locked.lock.held import Held
    from qemu_locked.model.config import Config
    from qemu_locked.model.plan import Plan

PREFIX = b"qemu-locked: "
_MAX_READCONFIG = 1 << 20


def fail(exc: QemuLockedError) -> NoReturn:
    out = b"".join(PREFIX + line.encode("utf-8", "surrogateescape") + b"\n" for line in exc.lines())
    try:
        os.write(2, out)
    except OSError:
        pass
    os._exit(exc.wrapper_exit_code())


def read_config_file(path: str) -> str:
    """-readconfig content; a regular file only (a FIFO must not block us,
    a device must not even be opened)."""
    from qemu_locked.lock.safeopen import open_regular

    try:
        fd = open_regular(path)
        try:
            data = os.read(fd, _MAX_READCONFIG + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ArgumentError("-readconfig", f"{path}: {exc.strerror}") from None
    if len(data) > _MAX_READCONFIG:
        raise ArgumentError("-readconfig", f"{path}: larger than 1 MiB")
    return data.decode("utf-8", "surrogateescape")


def read_user_config() -> str | None:
    """QEMU's default config file, or None when there is none (the only error
    QEMU itself ignores there)."""
    if not os.path.lexists(USER_CONFIG):
        return None
    return read_config_file(USER_CONFIG)


def arity_of(emulator: str, cfg: Config) -> Callable[[str], str]:
    """For options no table knows: ask the binary to be exec'd (start.probe),
    imported only when such an option shows up."""
    asked: list[Callable[[str], str]] = []

    def ask(option: str) -> str:
        from qemu_locked.start import probe

        if not asked:
            asked.append(probe.Prober(emulator, cfg.probe_cache_dir))
        try:
            return asked[0](option)
        except probe.ProbeFailed as exc:
            raise ArgumentError(
                "-" + option, f"cannot tell whether it takes a value ({emulator}: {exc})"
            ) from None

    return ask


def parse(args: list[str], cfg: Config, emulator: str | None) -> Plan:
    """The command line as QEMU reads it: unknown options asked of ``emulator``,
    /etc/qemu/qemu.conf's drives unless -no-user-config."""
    return parse_argv(
        args,
        read_config=read_config_file,
        arity=None if emulator is None else arity_of(emulator, cfg),
        user_config=read_user_config,
        honor_locking_off=cfg.honor_locking_off,
    )


def resolve(plan: Plan, cfg: Config, probe: bool = True) -> Plan:
    """What gets locked: with ``probe``, the backing files named in image
    headers added (read, never created); then the config's roles applied."""
    if probe and any(d.probe_backing or d.probe_data for d in plan.disks):
        from qemu_locked.start import chains

        plan = chains.resolve(plan)
    return plan.apply_roles(cfg.none_roles())


def prepare(args: list[str], cfg: Config, emulator: str | None = None) -> Plan:
    """The plan the wrapper locks: parsed, backing chains read, roles applied."""
    plan = resolve(parse(args, cfg, emulator), cfg)
    unknown = [s for s in plan.skipped if s.unknown]
    # Under the supervisor, what such a node opens is locked when QEMU opens it.
    if unknown and cfg.unknown_drivers == "refuse" and not cfg.supervisor:
        from qemu_locked.model.errors import UsageError

        s = unknown[0]  # our policy, not QEMU's rule: exit 2, not QEMU's 1
        raise UsageError(
            f"{s.source}: {s.reason}: QEMU may open a file here that cannot be locked; refused "
            '(unknown_drivers = "refuse"; "skip" starts it unlocked)'
        )
    return plan


def exec_program(path: str, argv: list[str]) -> NoReturn:
    """exec with the signal dispositions a program expects; raises OSError."""
    import _signal  # type: ignore[import-not-found]  # signal.py imports enum (~5 ms)

    # CPython ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec.
    for sig in (_signal.SIGPIPE, _signal.SIGXFSZ):
        _signal.signal(sig, _signal.SIG_DFL)
    os.execv(path, argv)


def exec_emulator(path: str, argv0: str, args: list[str]) -> NoReturn:
    try:
        exec_program(path, [argv0] + args)
    except OSError as exc:
        from qemu_locked.model.errors import EmulatorNotExecutable, EmulatorNotFound

        if exc.errno == 2:
            fail(EmulatorNotFound(f"emulator {path}: {exc.strerror}"))
        fail(EmulatorNotExecutable(f"emulator {path}: {exc.strerror}"))


def fill_stdio() -> None:
    """Open /dev/null on whichever of fds 0-2 is closed.

    Started with one closed, the next open() would take its number: an image
    or lease fd would become QEMU's stdin/stdout/stderr, and QEMU's output
    (and our error lines) would be written into it.  open() takes the lowest
    free number, so each one fills the lowest gap.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open("/dev/null", os.O_RDWR)  # lands on fd: every lower one is open
            os.set_inheritable(null, True)  # os.open() makes close-on-exec fds (PEP 446)


def main() -> NoReturn:
    fill_stdio()  # before anything else is opened
    argv0 = sys.argv[0]
    args = sys.argv[1:]
    held: Held | None = None
    cfg: Config | None = None
    plan: Plan | None = None
    try:
        cfg = _config.load()
        path = _emulator.find(cfg.emulator, argv0, argv0, os.environ.get("PATH", os.defpath))
        plan = prepare(args, cfg, path)
        if plan.disks or plan.uuid or plan.guest:
            import time

            from qemu_locked.backends import combined

            held = combined.acquire_all(plan, cfg, time.monotonic() + cfg.wait)
            if held is not None:
                held.inherit()
                if held.pending and not cfg.supervisor:  # else the supervisor waits for them
                    from qemu_locked.beside import keeper

                    keeper.start(held.pending, cfg, plan, held.fds[0] if held.fds else -1)
        if cfg.supervisor:
            from qemu_locked.beside.supervisor import start as supervisor

            fds, pending = (held.fds, held.pending) if held is not None else ([], [])
            supervisor.attach(fds, cfg, plan, pending)
        elif cfg.monitor_guard and plan.monitor_fd is not None:
            from qemu_locked.beside.guard import start as guard

            guard.attach(args, held.fds if held is not None else [], cfg, plan)
        # The start's locks in the audit trail; the supervisor records them instead, off our path.
        if held is not None and not cfg.supervisor:
            from qemu_locked.beside import audit

            audit.started(cfg, plan, os.getpid(), [p.label for p in held.pending])
    except QemuLockedError as exc:
        if held is not None:
            held.abandon()  # QEMU will not run: no record of ours may say it does
        if isinstance(exc, LockedError) and cfg is not None and plan is not None:
            exc.roles = {d.path: d.role for d in plan.disks}  # "share", not "read"
            # Raised by acquire_all, before any seccomp filter is on this process:
            # sending here opens no file under it.
            from qemu_locked.beside import audit

            audit.refused(cfg, plan, os.getpid(), exc.conflicts)
        fail(exc)
    except Exception as exc:  # a bug of ours: still one line, and QEMU does not start unlocked
        from qemu_locked.model.errors import InternalError

        if held is not None:
            held.abandon()
        fail(InternalError(f"internal error: {type(exc).__name__}: {exc}"))
    name = os.path.basename(argv0)
    exec_emulator(path, path if name in _emulator.OWN_NAMES else argv0, args)
