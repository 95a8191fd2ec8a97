"""What the guard's command handlers (guard/chain, guard/hmp, guard/media) use
of the Policy that calls them, as a Protocol: they depend on this shape, not
on guard/policy, which imports them.  Imported for type checking only.
"""

from __future__ import annotations

from typing import Protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from qemu_locked.beside.guard.nodes import Graph

    After = Callable[[bool], None]  # what runs once QEMU has answered (ok or not)


class PolicyView(Protocol):
    graph: Graph
    legacy: set[str]
    media: dict[str, str]

    def _use(
        self, path: str, mode: str, user: str, origin: str, defer_ok: bool = False
    ) -> None: ...

    def _unuse(self, users: set[str]) -> None: ...

    def _writer(self, name: str | None, tag: str, origin: str) -> None: ...

    def _tagged(self, tag: str, on_ok: Callable[[], None] | None = None) -> After: ...

    def _named(self, node: str | None, origin: str) -> None: ...

    def drive_mirror(self, args: dict[str, Any], tag: str) -> After: ...

    def snapshot_sync(self, args: dict[str, Any], tag: str) -> After: ...
