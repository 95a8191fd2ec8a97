"""Which real QEMU to exec.  Never ourselves.

Order: $QEMU_LOCKED_EMULATOR / config ``emulator``; when invoked under another
name (``qemu-system-x86_64`` as a symlink to us, or installed in its place with
``dpkg-divert``), the diverted binary next to us (``NAME.real``,
``NAME.distrib``) or the next ``NAME`` on PATH that is not us; then the host's
``qemu-system-<arch>``, ``qemu-kvm``, ``/usr/libexec/qemu-kvm``.
"""

from __future__ import annotations

import os
import stat

from qemu_locked.model.errors import EmulatorNotExecutable, EmulatorNotFound

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

OWN_NAMES = ("qemu-locked",)
_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64",
         "ppc64le": "ppc64", "s390x": "s390x", "riscv64": "riscv64", "i686": "i386"}  # fmt: skip


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _candidates(invoked_as: str, path_env: str) -> Iterator[str]:
    name = os.path.basename(invoked_as)
    if name and name not in OWN_NAMES:
        here = os.path.dirname(invoked_as)
        if here:
            for suffix in (".real", ".distrib"):
                yield os.path.join(here, name + suffix)
        for d in path_env.split(os.pathsep):
            if d:
                yield os.path.join(d, name)
                for suffix in (".real", ".distrib"):
                    yield os.path.join(d, name + suffix)
    arch = _ARCH.get(os.uname().machine, os.uname().machine)
    for d in path_env.split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        if d:
            yield os.path.join(d, f"qemu-system-{arch}")
            yield os.path.join(d, "qemu-kvm")
    yield "/usr/libexec/qemu-kvm"


def check_executable(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise EmulatorNotFound(f"emulator {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
        raise EmulatorNotExecutable(f"emulator {path}: not an executable file")
    return path


def find(configured: str, invoked_as: str, self_path: str, path_env: str) -> str:
    """The emulator path to exec, or EmulatorNotFound/EmulatorNotExecutable."""
    me = _identity(self_path)
    if configured:
        if _identity(configured) == me and me is not None:
            raise EmulatorNotFound(f"emulator {configured} is qemu-locked itself")
        return check_executable(configured)
    seen: set[str] = set()
    for cand in _candidates(invoked_as, path_env):
        if cand in seen:
            continue
        seen.add(cand)
        ident = _identity(cand)
        if ident is None or ident == me:
            continue
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise EmulatorNotFound(
        "no QEMU emulator found: set QEMU_LOCKED_EMULATOR or 'emulator' in the config file"
    )
