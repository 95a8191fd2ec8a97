"""Erasing the records a VM's locks wrote, as it lets them go (the process beside QEMU).

A record is trusted only while its slot is locked, so one left behind misleads no
start; but ``status`` lists it as stale and ``gc`` has to come by.  The supervisor
(or the monitor guard) holds copies of QEMU's lease descriptions, so when QEMU exits,
or closes a disk whose lock is then let go, it erases QEMU's records while the slots
are still its own: nobody else can have written there.  A holder killed outright (the
supervisor included) still leaves its records to ``qemu-lockctl lockspace gc``.
"""

from __future__ import annotations

import os

from qemu_locked.backends.lockspace.record import MAGIC, RECORD_SIZE, decode_record

MAX_SLOT = 1024  # leases.SLOTS is 64; a bound on a range read from /proc all the same


def _held_slots(fd: int) -> set[int]:
    """The bytes this open file description write-locks: its record slots (byte 0
    is the lease itself, never a slot).  The kernel merges one description's
    adjacent locks: the lease and slot 1 show as one range, 0 to 1."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
            info = f.read()
    except OSError:
        return set()
    out: set[int] = set()
    for line in info.splitlines():
        # lock:	1: OFDLCK  ADVISORY  WRITE -1 08:02:1234 0 1
        parts = line.split()
        if len(parts) < 9 or parts[0] != "lock:" or parts[4] != "WRITE":
            continue
        try:
            start, end = int(parts[7]), int(parts[8])
        except ValueError:
            continue  # to EOF: no record slot is locked that way
        out.update(range(max(start, 1), min(end, MAX_SLOT) + 1))
    return out


def erase_records(fds: list[int], pid: int) -> int:
    """Zero the records ``pid`` wrote in the slots these descriptions hold; how many."""
    erased = 0
    for fd in fds:
        for slot in sorted(_held_slots(fd)):
            try:
                raw = os.pread(fd, RECORD_SIZE, slot * RECORD_SIZE)
            except OSError:
                continue
            rec = decode_record(slot, raw) if raw.startswith(MAGIC) else None
            if rec is None or rec.pid != pid:
                continue
            try:
                os.pwrite(fd, bytes(RECORD_SIZE), slot * RECORD_SIZE)
                erased += 1
            except OSError:
                pass  # read-only or gone: left for gc, as a crash's would be
    return erased
