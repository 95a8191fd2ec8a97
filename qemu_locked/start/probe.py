"""Whether an option the table does not know takes a value, asked of the QEMU binary.

QEMU checks the whole command line in a first pass before it does anything, so
``QEMU -OPT -zz-a -zz-b`` always fails there, and the option its error names tells
the arity: ``-OPT`` (QEMU does not know it), ``-zz-a`` (-OPT took no value, so -zz-a
was the next option) or ``-zz-b`` (-OPT took -zz-a as its value).  Nothing runs: no
disk is opened, no device created.

Answers are cached per binary in one small file, keyed by the binary's path, size,
mtime and ctime (a package upgrade changes them).  The cache lives where the user
starting the VM can write (``probe_cache_dir``, else $XDG_CACHE_HOME/qemu-locked, else
~/.cache/qemu-locked); when it cannot be written the binary is asked every time.
"""

from __future__ import annotations

import os

TAKES_VALUE = "arg"
NO_VALUE = "none"
UNKNOWN = "unknown"
_ANSWERS = (TAKES_VALUE, NO_VALUE, UNKNOWN)
_HEADER = "qemu-locked option probe 1"
_TIMEOUT = 10.0  # seconds; a first pass takes 17-75 ms here
_MAX_OUTPUT = 1 << 16
# What QEMU option names are made of.  No QEMU knows a name with anything else, and
# such a name is neither run nor cached (a tab or newline would write cache lines).
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class ProbeFailed(Exception):
    """The binary's answer could not be read (the message says why)."""


def classify(option: str, stderr: str) -> str:
    """The arity QEMU's first-pass error for ``-OPTION -zz-a -zz-b`` shows."""
    for line in stderr.splitlines():
        if line.endswith(": -zz-b: invalid option"):
            return TAKES_VALUE
        if line.endswith(": -zz-a: invalid option"):
            return NO_VALUE
        if line.endswith(f": -{option}: invalid option"):
            return UNKNOWN
    first = stderr.strip().splitlines()[0] if stderr.strip() else "no output"
    raise ProbeFailed(first)


def ask(binary: str, option: str) -> str:
    """Run the binary's first pass once; TAKES_VALUE, NO_VALUE or UNKNOWN."""
    import select

    rfd, wfd = os.pipe()
    try:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            actions = [
                (os.POSIX_SPAWN_DUP2, null, 0),
                (os.POSIX_SPAWN_DUP2, null, 1),
                (os.POSIX_SPAWN_DUP2, wfd, 2),
            ]
            env = dict(os.environ, LC_ALL="C")
            try:
                pid = os.posix_spawn(
                    binary, [binary, "-" + option, "-zz-a", "-zz-b"], env, file_actions=actions
                )
            except OSError as exc:
                raise ProbeFailed(f"{binary}: {exc.strerror}") from None
        finally:
            os.close(null)
    finally:
        os.close(wfd)
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= _MAX_OUTPUT:
            ready, _w, _x = select.select([rfd], [], [], _TIMEOUT)
            if not ready:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise ProbeFailed(f"no answer within {_TIMEOUT:.0f} s")
            chunk = os.read(rfd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(rfd)
    os.waitpid(pid, 0)
    return classify(option, b"".join(chunks).decode("utf-8", "replace"))


def _identity(binary: str) -> str:
    st = os.stat(binary)
    return f"{_HEADER}\t{binary}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}"


def cache_dir(configured: str) -> str:
    if configured:
        return configured
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return os.path.join(xdg, "qemu-locked")
    return os.path.join(os.path.expanduser("~"), ".cache", "qemu-locked")


def cache_file(directory: str, binary: str) -> str:
    name = binary.replace("%", "%25").replace("/", "%2F")
    return os.path.join(directory, "probe-" + name)


def load(path: str, identity: str) -> dict[str, str]:
    """The cached answers, or nothing when the file is missing or for another binary."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read(_MAX_OUTPUT).splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    if not lines or lines[0] != identity:
        return {}
    out: dict[str, str] = {}
    for line in lines[1:]:
        option, _tab, answer = line.partition("\t")
        if answer in _ANSWERS:
            out[option] = answer
    return out


def store(path: str, identity: str, answers: dict[str, str]) -> None:
    """Replace the cache file atomically; a cache we cannot write is no error."""
    body = identity + "\n" + "".join(f"{o}\t{a}\n" for o, a in sorted(answers.items()))
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, body.encode("utf-8"))
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


class Prober:
    """``arity(option)`` for the argv walk: cached answers first, then the binary."""

    def __init__(self, binary: str, configured_dir: str = "") -> None:
        self.binary = binary
        self.directory = cache_dir(configured_dir)
        self._answers: dict[str, str] | None = None
        self._identity = ""
        self._path = ""

    def __call__(self, option: str) -> str:
        if not option or not _NAME_CHARS.issuperset(option):
            return UNKNOWN
        if self._answers is None:
            try:
                self._identity = _identity(self.binary)
            except OSError as exc:
                raise ProbeFailed(f"{self.binary}: {exc.strerror}") from None
            self._path = cache_file(self.directory, self.binary)
            self._answers = load(self._path, self._identity)
        answer = self._answers.get(option)
        if answer is None:
            answer = ask(self.binary, option)
            self._answers[option] = answer
            store(self._path, self._identity, self._answers)
        return answer
