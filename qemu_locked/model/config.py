"""Settings: /etc/qemu-locked/qemu-locked.toml (or $QEMU_LOCKED_CONFIG), then
``QEMU_LOCKED_<KEY>`` environment variables.  Never the command line: every
argument of ``qemu-locked`` belongs to QEMU.

Flat ``key = value`` files (all this config needs) are read by a small reader
of that TOML subset; anything else goes to :mod:`tomllib`.  The reason is the
VM start path: ``import tomllib`` costs ~20 ms here, more than the whole
interpreter start.  The tests check the two agree.
"""

from __future__ import annotations

import math
import os
import stat

from qemu_locked.model.errors import ConfigError
from qemu_locked.model.value import frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

DEFAULT_PATH = "/etc/qemu-locked/qemu-locked.toml"
BACKENDS = ("direct", "lockspace", "sanlock")
ROLE_MODES = ("shared", "none")
TIMEOUT_ACTIONS = ("warn", "kill")
UNKNOWN_DRIVER_ACTIONS = ("refuse", "skip")
_MAX_CONFIG = 1 << 20


@frozen
class Config:
    backend: str = "direct"
    emulator: str = ""
    lockspace_dir: str = "/var/lib/qemu-locked/lockspace"
    host_name: str = ""  # "" = this host's name
    readonly: str = "shared"
    backing: str = "shared"
    shareable: str = "shared"
    domain_lease: bool = True
    wait: float = 0.0
    incoming_wait: float = 600.0
    incoming_timeout_action: str = "kill"
    # A block node of a driver we do not know may open a file we cannot lock:
    # fail closed unless told otherwise (README, "Lock semantics").
    unknown_drivers: str = "refuse"
    # The kernel's word on every open QEMU makes after start (docs/supervisor.md);
    # off only by choice: start-time locks only, plus the monitor guard if asked.
    supervisor: bool = True
    monitor_guard: bool = False
    sanlock_lockspace: str = "qemu-locked"
    sanlock_path: str = ""
    sanlock_offset: int = 0
    sanlock_resources: str = ""
    sanlock_host_id: int = 0
    sanlock_io_timeout: int = 10
    honor_locking_off: bool = True
    probe_cache_dir: str = ""
    # The audit trail (model/audit.py): where it is sent, and where `qemu-lockctl log`
    # reads it back when journald is not there ("" = the first of /var/log/syslog,
    # /var/log/messages, /var/log/daemon.log that exists).
    audit: bool = True
    audit_socket: str = "/dev/log"
    audit_file: str = ""
    source: str = "(defaults)"

    def effective_host(self) -> str:
        return self.host_name or os.uname().nodename

    def none_roles(self) -> tuple[str, ...]:
        """The disk roles this config does not lock (``readonly = "none"``...)."""
        return tuple(r for r in ("readonly", "backing", "shareable") if getattr(self, r) == "none")


_TYPES: dict[str, type] = {
    "backend": str, "emulator": str, "lockspace_dir": str, "host_name": str,
    "readonly": str, "backing": str, "shareable": str, "domain_lease": bool,
    "wait": float, "incoming_wait": float, "incoming_timeout_action": str, "unknown_drivers": str,
    "monitor_guard": bool, "supervisor": bool,
    "sanlock_lockspace": str, "sanlock_path": str, "sanlock_offset": int,
    "sanlock_resources": str, "sanlock_host_id": int, "sanlock_io_timeout": int,
    "honor_locking_off": bool, "probe_cache_dir": str,
    "audit": bool, "audit_socket": str, "audit_file": str,
}  # fmt: skip
_CHOICES: dict[str, tuple[str, ...]] = {
    "backend": BACKENDS,
    "readonly": ROLE_MODES,
    "backing": ROLE_MODES,
    "shareable": ROLE_MODES,
    "incoming_timeout_action": TIMEOUT_ACTIONS,
    "unknown_drivers": UNKNOWN_DRIVER_ACTIONS,
}


class _NotSimple(Exception):
    pass


_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


def _simple_value(text: str) -> object:
    if text.startswith('"'):
        out: list[str] = []
        i = 1
        while i < len(text):
            c = text[i]
            if c == '"':
                rest = text[i + 1 :].strip()
                if rest and not rest.startswith("#"):
                    raise _NotSimple
                return "".join(out)
            if c == "\\":
                e = text[i + 1 : i + 2]
                if e not in _ESCAPES:
                    raise _NotSimple
                out.append(_ESCAPES[e])
                i += 2
                continue
            if c < " " and c != "\t":
                raise _NotSimple
            out.append(c)
            i += 1
        raise _NotSimple
    if text.startswith("'"):
        end = text.find("'", 1)
        rest = text[end + 1 :].strip() if end > 0 else "x"
        if end < 0 or (rest and not rest.startswith("#")):
            raise _NotSimple
        return text[1:end]
    word = text.split("#", 1)[0].strip()
    if word == "true":
        return True
    if word == "false":
        return False
    digits = word[1:] if word[:1] in "+-" else word
    if digits.isdigit() and digits.isascii() and (digits == "0" or not digits.startswith("0")):
        return int(word)
    raise _NotSimple


def _parse_simple(text: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or not key.replace("_", "").replace("-", "").isalnum() or not key.isascii():
            raise _NotSimple
        if key in out:
            raise _NotSimple  # let tomllib produce its own error
        out[key] = _simple_value(value.strip())
    return out


def parse_toml(text: str, source: str) -> dict[str, object]:
    try:
        return _parse_simple(text)
    except _NotSimple:
        pass
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, None, f"not valid TOML: {exc}") from None


def _coerce(key: str, value: object, source: str) -> object:
    want = _TYPES[key]
    if want is bool:
        if isinstance(value, str) and source.startswith("$"):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"must be true or false, not {value!r}")
        return value
    if want in (int, float):
        if isinstance(value, str) and source.startswith("$"):
            try:
                value = want(value.strip())
            except ValueError:
                raise ConfigError(source, key, f"must be a number, not {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"must be a number, not {value!r}")
        if want is int and not isinstance(value, int):
            raise ConfigError(source, key, f"must be a whole number, not {value!r}")
        if value < 0 or not math.isfinite(value):
            raise ConfigError(source, key, f"must be a finite number >= 0, not {value!r}")
        return want(value)
    if not isinstance(value, str):
        raise ConfigError(source, key, f"must be a string, not {value!r}")
    if "\0" in value:
        raise ConfigError(source, key, "must not contain a NUL byte")
    choices = _CHOICES.get(key)
    if choices and value not in choices:
        raise ConfigError(source, key, f"must be one of {', '.join(choices)}, not {value!r}")
    is_path = key in (
        "emulator",
        "lockspace_dir",
        "sanlock_path",
        "sanlock_resources",
        "probe_cache_dir",
        "audit_socket",
        "audit_file",
    )
    if is_path and value and not value.startswith("/"):
        raise ConfigError(source, key, f"must be an absolute path, not {value!r}")
    return value


def _read_file(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(path, None, "not a regular file")
        data = os.read(fd, _MAX_CONFIG + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_CONFIG:
        raise ConfigError(path, None, "larger than 1 MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, None, "not UTF-8") from None


def load(environ: Mapping[str, str] | None = None) -> Config:
    """The effective configuration.  A missing default file means defaults; a
    missing file named by $QEMU_LOCKED_CONFIG is an error."""
    env = os.environ if environ is None else environ
    explicit = env.get("QEMU_LOCKED_CONFIG")
    path = explicit or DEFAULT_PATH
    values: dict[str, object] = {}
    text = _read_file(path)
    if text is None and explicit:
        raise ConfigError(path, None, "no such file (named by QEMU_LOCKED_CONFIG)")
    source = "(defaults)"
    if text is not None:
        source = path
        for key, value in parse_toml(text, path).items():
            if key not in _TYPES:
                raise ConfigError(path, key, "unknown key")
            values[key] = _coerce(key, value, path)
    for key in _TYPES:
        raw = env.get("QEMU_LOCKED_" + key.upper())
        if raw is not None:
            values[key] = _coerce(key, raw, "$QEMU_LOCKED_" + key.upper())
    return Config(source=source, **values)  # type: ignore[arg-type]
