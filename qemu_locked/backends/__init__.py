"""Lock backends: one module each, chosen explicitly by config ``backend``.

The contract is :class:`qemu_locked.backends.protocol.Backend`; the domain
lease every backend shares is added by :mod:`qemu_locked.backends.combined`.
"""

from __future__ import annotations

from qemu_locked.model.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.backends.protocol import Backend


def load(name: str) -> Backend:
    """The backend module for a config ``backend`` value.  Never a fallback."""
    if name == "direct":
        from qemu_locked.backends import direct

        return direct
    if name == "lockspace":
        from qemu_locked.backends import lockspace

        return lockspace
    if name == "sanlock":
        from qemu_locked.backends.sanlock import start

        return start
    raise ConfigError("backend", None, f"unknown backend {name!r}")
