"""The monitor guard's share of start/chains.py: what an image added at run
time (blockdev-add, drive_add, a media change) makes QEMU open from its header."""

from __future__ import annotations

import os

from qemu_locked.beside.locks import Refused
from qemu_locked.lock.safeopen import MAX_CHAIN, plain_name, qcow2_names
from qemu_locked.model.plan import SHARED

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.beside.guard.view import PolicyView


def header_files(policy: PolicyView, path: str, mode: str, user: str, origin: str,
                 backing: bool = True, defer_ok: bool = False) -> None:  # fmt: skip
    """Files QEMU opens from an image header on its own, as start/chains.py
    finds them at start: the external data file, in the image's mode (the
    guest's data is written there), and, unless the backing was given, the
    backing chain, shared, through each one's header in turn."""
    cur = path
    for _ in range(MAX_CHAIN):
        found = qcow2_names(cur)
        if found is None:
            return
        if found.data_file is not None:
            if not plain_name(found.data_file):
                raise Refused(f"qemu-locked: {cur} names data file '{found.data_file}', "
                              "which is not a plain file: it cannot be locked")  # fmt: skip
            # relative: to QEMU's working directory, which is ours (see chains.py)
            data = os.path.join(os.getcwd(), found.data_file)
            policy._use(data, mode, user, f"data file of {cur}", defer_ok)
        name = found.backing
        if not backing or not name or not plain_name(name):
            return
        cur = name if name.startswith("/") else os.path.join(os.path.dirname(cur), name)
        mode, defer_ok = SHARED, False
        policy._use(cur, SHARED, user, origin)
