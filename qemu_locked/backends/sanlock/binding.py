"""The sanlock binding (Debian's python3-sanlock) and its error codes.

Kept apart so that every part of the sanlock backend (start path, admin,
doctor) loads the extension one way and reads errors one way.
"""

from __future__ import annotations

import os
import sys

from qemu_locked.model.errors import BackendError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

ALIGN = 1 << 20  # lease area size: 1 MiB (512-byte sectors, sanlock's default)
SECTOR = 512
MAX_HOSTS = 2000  # host ids that fit in a 1 MiB lockspace with 512-byte sectors
DEFAULT_SLOTS = 256
ALLOC_PREFIX = "qemu-locked-slots-"
NAME_PREFIX = "qlk-"

# sanlock errnos (python SanlockException.errno)
E_AGAIN, E_BUSY, E_EXIST, E_NOENT, E_NOSPC = 11, 16, 17, 2, 28
E_HELD_OTHER_HOST = -243  # "Lease is held by another host"
E_NO_LEASE = -223  # "Lease does not exist on storage"
# Paxos ballot races between hosts acquiring at the same instant: -245 (local
# commit, the notes' SH vs SH), -244 (other ballot: seen here when two hosts
# create leases at once), -212/-213 (new/current ballot), -222 (inconsistent read).
TRANSIENT = frozenset({E_AGAIN, E_BUSY, -245, -244, -213, -212, -222})
# A real holder: here (17), on a live host (-243), an exclusive owner against a
# shared request (-246), owned by another host (-247).
HELD = frozenset({E_EXIST, E_HELD_OTHER_HOST, -246, -247})
NOT_JOINED = frozenset({E_NOENT, -E_NOENT, E_NOSPC, -E_NOSPC, -241})
ALLOC_WAIT = 5.0  # seconds to wait for the allocator lease (creation takes ms)
TRANSIENT_BUDGET = 5.0  # seconds of retrying transient errors, on top of `wait`
_BACKOFF_FIRST, _BACKOFF_MAX = 0.01, 0.5

DIST_PACKAGES = "/usr/lib/python3/dist-packages"

_binding: ModuleType | None = None
_binding_origin = ""


# -- the binding ---------------------------------------------------------------


def _so_suffixes() -> list[str]:
    import _imp

    return [s for s in _imp.extension_suffixes() if s != ".so"] + [".so"]


def binding() -> ModuleType:
    """Debian's python3-sanlock extension module.

    Loaded from its file in /usr/lib/python3/dist-packages by an
    ExtensionFileLoader (the venv does not see system site-packages), for
    this interpreter's ABI tag only; then, as a fallback for other layouts,
    a plain ``import sanlock``.
    """
    global _binding, _binding_origin
    if _binding is not None:
        return _binding
    from importlib.machinery import ExtensionFileLoader, ModuleSpec

    tried: list[str] = []
    for suffix in _so_suffixes():
        path = f"{DIST_PACKAGES}/sanlock{suffix}"
        tried.append(path)
        if not os.path.exists(path):
            continue
        loader = ExtensionFileLoader("sanlock", path)
        spec = ModuleSpec("sanlock", loader, origin=path)
        try:
            module = loader.create_module(spec)
            loader.exec_module(module)
        except ImportError as exc:
            raise BackendError(f"sanlock binding {path}: cannot load: {exc}") from None
        sys.modules.setdefault("sanlock", module)
        _binding, _binding_origin = module, path
        return module
    try:
        import sanlock as imported
    except ImportError:
        abi = _so_suffixes()[0]
        raise BackendError(
            "sanlock binding not found: install python3-sanlock (Debian) and build the "
            f"venv from /usr/bin/python3 (this interpreter needs sanlock{abi}; tried "
            + ", ".join(tried)
            + ")"
        ) from None
    found: ModuleType = imported
    _binding, _binding_origin = found, str(getattr(found, "__file__", "sanlock"))
    return found


def binding_origin() -> str:
    binding()
    return _binding_origin


def errno_of(exc: BaseException) -> int:
    value = getattr(exc, "errno", None)
    if isinstance(value, int):
        return value
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else 0


def why(exc: BaseException) -> str:
    args: tuple[object, ...] = tuple(getattr(exc, "args", ()))
    if len(args) >= 3:
        return f"{args[1]}: {args[2]} ({args[0]})"
    return str(exc)


def run_dir() -> str:
    return os.environ.get("SANLOCK_RUN_DIR", "/run/sanlock")


def daemon_error(exc: BaseException, what: str) -> BackendError:
    code = errno_of(exc)
    if code in (E_NOENT, 111, 13):  # no socket, refused, permission
        return BackendError(
            f"sanlock: {what}: no sanlock daemon reachable at {run_dir()}/sanlock.sock ({why(exc)})"
        )
    return BackendError(f"sanlock: {what}: {why(exc)}")
