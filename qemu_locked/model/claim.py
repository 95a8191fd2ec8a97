"""A claim: one resource wanted in one mode.

Every backend turns a plan into claims (a file's inode, a lease key, a
sanlock resource) and locks them in one global order, each once, in the
strongest mode any of its uses needs (DESIGN section 3).
"""

from __future__ import annotations

from qemu_locked.model.plan import EXCLUSIVE, stronger
from qemu_locked.model.value import frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable


@frozen
class Claim:
    key: str  # what identifies the resource to every taker (inode, lease key...)
    mode: str  # EXCLUSIVE | SHARED
    label: str  # what messages call it (a path, "domain 'web'")

    @property
    def exclusive(self) -> bool:
        return self.mode == EXCLUSIVE


def merged(claims: Iterable[Claim], order: Callable[[Claim], str] | None = None) -> list[Claim]:
    """One claim per key, strongest mode, first label; sorted into the global
    lock order (by key, or by ``order``) so that no two takers wait in a cycle."""
    by_key: dict[str, Claim] = {}
    for c in claims:
        prev = by_key.get(c.key)
        by_key[c.key] = c if prev is None else Claim(c.key, stronger(prev.mode, c.mode), prev.label)
    return sorted(by_key.values(), key=order or (lambda c: c.key))
