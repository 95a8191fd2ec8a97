"""The words every message uses (issue 23): what the VM asked for and how a holder holds.

A VM asks *to write* a disk (an exclusive lock), *to read* it (shared: read-only disks,
backing files, media) or *to share* it (shared too: a disk declared shareable, written by
several VMs).  A holder has it *writing* (exclusive) or *sharing* (shared: its readers
and the writers of a shareable disk hold the same lock, so that is all a lock can tell).
The start refusal, the hot-plug refusal, the migration keeper, ``check``, ``status`` and
the audit trail all say it with these functions; ``--json`` keeps the lock modes
(``exclusive``/``shared``) scripts already read.  No I/O here.
"""

from __future__ import annotations

from qemu_locked.model.plan import EXCLUSIVE, SHAREABLE, SHARED

WRITING, SHARING = "writing", "sharing"
DOMAIN = "domain "  # how a domain lease's label starts (lock.keys.domain_label)


def want(mode: str, role: str = "") -> str:
    """``write`` / ``read`` / ``share``: what a VM asks for in ``mode`` (its role,
    when known, tells a shareable disk's writer from a reader)."""
    if mode == EXCLUSIVE:
        return "write"
    return "share" if role == SHAREABLE else "read"


def wanted(resource: str, mode: str, role: str = "") -> str:
    """:func:`want`, and ``start`` for a domain lease (the VM itself)."""
    return "start" if resource.startswith(DOMAIN) else want(mode, role)


def how(mode: str) -> str:
    """How a holder holds a lock of ``mode``: ``writing`` or ``sharing``."""
    return WRITING if mode == EXCLUSIVE else SHARING


def split_holders(holders: str) -> tuple[str, str]:
    """``(exclusive) by pid 1, guest 'a'`` -> (``exclusive``, ``pid 1, guest 'a'``): the
    form every backend describes its holders in.  Anything else: (``exclusive``, it)."""
    if holders.startswith("("):
        mode, sep, rest = holders[1:].partition(") ")
        if sep and mode in (EXCLUSIVE, SHARED):
            return mode, rest.removeprefix("by ")
    return EXCLUSIVE, holders.removeprefix("by ")


def held(holders: str) -> str:
    """``in use (writing) by pid 1, guest 'a' on host 'h'``: who holds it, and how."""
    mode, who = split_holders(holders)
    return f"in use ({how(mode)}) by {who}"


def refusal(resource: str, mode: str, holders: str, when: str = "", role: str = "") -> str:
    """One refused resource: ``cannot write /x.img: in use (writing) by pid 1, guest 'a'``.
    ``when`` goes after the resource (the keeper's ``after 600 s of incoming
    migration``).  A domain lease is the VM itself: ``cannot start domain UUID:
    already running, held by ...``."""
    what = f"cannot {wanted(resource, mode, role)} {resource}" + (f" {when}" if when else "")
    if resource.startswith(DOMAIN):
        return f"{what}: already running, held by {split_holders(holders)[1]}"
    return f"{what}: {held(holders)}"
