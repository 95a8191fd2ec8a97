"""QEMU argv -> Plan.  Pure: no file is touched (``-readconfig`` content comes
through the ``read_config`` callback).

The walk follows QEMU's own first pass: an option either takes the next
argument as its value (parse.options) or stands alone; anything not starting
with ``-`` is an image.  What it collects goes into the block graph
(parse.blockgraph), which finds the files and their modes.
"""

from __future__ import annotations

from qemu_locked.model.errors import ArgumentError
from qemu_locked.model.plan import Plan, Skipped, merge_by_path
from qemu_locked.parse.blockgraph import Graph
from qemu_locked.parse.keyval import TRUE, dict_or_opts, nest, split_opts
from qemu_locked.parse.options import ARG_OPTIONS, IMAGE_OPTIONS, NO_ARG_OPTIONS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    ReadConfig = Callable[[str], str]
    # option name -> "arg" | "none" | "unknown", asked of the binary (start.probe)
    Arity = Callable[[str], str]

# Read by QEMU unless -no-user-config is given (Debian's CONFIG_QEMU_CONFDIR);
# libvirt always passes -no-user-config.
USER_CONFIG = "/etc/qemu/qemu.conf"

_MAX_READCONFIG_DEPTH = 16
# Options naming QEMU's own bookkeeping files (never disks: QEMU may lock them
# itself, as it lockf()s a -pidfile), and those taking a character device that
# may be a file: or pipe: (the seccomp supervisor lets their opens pass).
_BOOKKEEPING = ("pidfile", "D")
_CHAR_BACKENDS = ("serial", "parallel", "monitor", "qmp", "qmp-pretty", "debugcon")


class _Walk:
    def __init__(self, read_config: ReadConfig | None, arity: Arity | None) -> None:
        self.read_config = read_config
        self.arity = arity
        self.user_config = True
        self.graph = Graph()
        self.daemonize = False
        self.guest: str | None = None
        self.uuid: str | None = None
        self.incoming: str | None = None
        self.readconfig_depth = 0
        self.server_sockets: dict[str, int] = {}  # -chardev socket,fd=N,server=on by id
        self.control_mons: list[str] = []  # chardev ids of -mon ...,mode=control
        self.bookkeeping: list[str] = []  # pid, log, trace and character-device files

    def parse(self, args: Sequence[str]) -> None:
        i, n = 0, len(args)
        while i < n:
            arg = args[i]
            if not arg.startswith("-") or arg in ("-", "--"):
                if arg.startswith("-"):
                    i += 1
                    continue
                # A bare argument is an image for the first IDE disk.
                self._image(f"image argument #{i + 1}", arg, "ide", "disk")
                i += 1
                continue
            name = arg[2:] if arg.startswith("--") else arg[1:]
            if name not in ARG_OPTIONS and (name in NO_ARG_OPTIONS or not self._takes_value(arg)):
                if name == "snapshot":
                    self.graph.snapshot = True
                elif name == "daemonize":
                    self.daemonize = True
                elif name == "no-user-config":
                    self.user_config = False
                i += 1
                continue
            if i + 1 >= n:
                raise ArgumentError(arg, "requires an argument")
            self._option(arg, name, args[i + 1])
            i += 2

    def _option(self, arg: str, name: str, value: str) -> None:
        g = self.graph
        if name == "drive":
            g.drives.append((f"{arg} {value}", nest(split_opts(value), arg, drive=True), "ide"))
        elif name == "blockdev":
            g.blockdevs.append((f"{arg} {value}", dict_or_opts(value, arg, "driver")))
        elif name == "device":
            g.devices.append(dict_or_opts(value, arg, "driver"))
        elif name in IMAGE_OPTIONS:
            if_, media = IMAGE_OPTIONS[name]
            self._image(f"{arg} {value}", value, if_, media)
        elif name == "add-fd":
            opts = dict(split_opts(value))
            if "fd" not in opts or "set" not in opts:
                raise ArgumentError(arg, "needs fd= and set=")
            g.fdsets.setdefault(opts["set"], []).append(opts["fd"])
        elif name == "name":
            self.guest = dict(split_opts(value, "guest")).get("guest") or self.guest
        elif name == "uuid":
            self.uuid = value
        elif name == "incoming":
            self.incoming = value
        elif name == "set":
            self._set(arg, value)
        elif name == "readconfig":
            self._readconfig(arg, value)
        elif name in _BOOKKEEPING:
            self.bookkeeping.append(value)
        elif name in _CHAR_BACKENDS:
            if value.startswith(("file:", "pipe:")):
                self.bookkeeping.append(value.split(":", 1)[1].split(",", 1)[0])
        elif name == "trace":
            self.bookkeeping += [v for k, v in split_opts(value, "enable") if k == "file"]
        elif name == "chardev":
            kv = dict(split_opts(value, "backend"))
            self.bookkeeping += [kv[k] for k in ("path", "logfile") if kv.get(k)]
            fd = kv.get("fd", "")
            if kv.get("backend") == "socket" and fd.isdigit() and kv.get("server", "off") in TRUE:
                self.server_sockets[kv.get("id", "")] = int(fd)
        elif name == "mon":
            kv = dict(split_opts(value, "chardev"))
            if kv.get("mode") == "control":
                self.control_mons.append(kv.get("chardev", ""))

    def monitor_fd(self) -> int | None:
        """fd N of a QMP monitor handed over as a listening socket (libvirt's way)."""
        for chardev in self.control_mons:
            if chardev in self.server_sockets:
                return self.server_sockets[chardev]
        return None

    def _takes_value(self, arg: str) -> bool:
        """An option no table knows: never guess, ask the binary to be exec'd."""
        name = arg.lstrip("-")
        if self.arity is None:
            raise ArgumentError(
                arg, "unknown option (no QEMU binary to ask whether it takes a value)"
            )
        answer = self.arity(name)
        if answer == "unknown":
            raise ArgumentError(arg, "invalid option (the QEMU binary does not know it)")
        return answer == "arg"

    def _image(self, origin: str, filename: str, if_: str, media: str) -> None:
        if not filename:
            self.graph.skipped.append(Skipped(origin, "no medium"))
            return
        self.graph.drives.append((origin, {"file": filename, "media": media}, if_))

    def _set(self, arg: str, value: str) -> None:
        target, eq, val = value.partition("=")
        parts = target.split(".", 2)
        if not eq or len(parts) != 3:
            raise ArgumentError(arg, f"'{value}' is not group.id.key=value")
        self.graph.sets.append((parts[0], parts[1], parts[2] + "=" + val))

    def _readconfig(self, arg: str, path: str) -> None:
        if self.read_config is None:
            self.graph.skipped.append(Skipped(f"{arg} {path}", "config file not read here"))
            return
        self.readconfig_depth += 1
        if self.readconfig_depth > _MAX_READCONFIG_DEPTH:
            raise ArgumentError(arg, f"more than {_MAX_READCONFIG_DEPTH} -readconfig files")
        from qemu_locked.parse import readconfig  # rare: libvirt never passes it

        for group, opts in readconfig.groups(self.read_config(path), arg, path):
            if group == "drive":
                self.graph.drives.append(
                    (f"{arg} {path} [drive]", nest(opts, arg, drive=True), "ide")
                )
            elif group == "device":
                self.graph.devices.append(nest(opts, arg))


def parse_argv(
    args: Sequence[str],
    read_config: ReadConfig | None = None,
    arity: Arity | None = None,
    *,
    user_config: Callable[[], str | None] | None = None,
    honor_locking_off: bool = True,
) -> Plan:
    """The lock plan for a QEMU command line (without the program name).

    ``user_config``: the text of QEMU's default config file (None when there is
    none), whose ``[drive]`` sections QEMU reads unless -no-user-config is given.
    """
    walk = _Walk(read_config, arity)
    walk.graph.honor_locking_off = honor_locking_off
    walk.parse(args)
    if walk.user_config and user_config is not None:
        text = user_config()
        if text is not None:
            walk.read_config = lambda _path: text
            walk._readconfig("(default config)", USER_CONFIG)
    walk.graph.build()
    return Plan(
        disks=merge_by_path(walk.graph.disks),
        skipped=tuple(walk.graph.skipped),
        guest=walk.guest,
        uuid=walk.uuid,
        incoming=walk.incoming,
        daemonize=walk.daemonize,
        monitor_fd=walk.monitor_fd(),
        bookkeeping=tuple(walk.bookkeeping),
    )
