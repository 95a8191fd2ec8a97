"""Who made a trapped call, and what it named: the caller's process (QEMU or a
child of it) and the strings in its memory.

One /proc/PID/mem per process (its threads share the memory).  Reading
another process's memory is a ptrace attach check (same user, Yama, the
host's security policy): a denial is Blind, and the supervisor fails closed.
"""

from __future__ import annotations

import os

from qemu_locked.beside.supervisor import kernel, paths


class Callers:
    def __init__(self) -> None:
        self.process_of: dict[int, int] = {}  # calling thread -> its process (-1: unknown)
        self.mems: dict[int, int] = {}  # process -> its /proc/PID/mem

    def note(self, tid: int) -> None:
        """The process a calling thread belongs to (QEMU, or a child of it)."""
        if tid in self.process_of:
            return
        self.process_of[tid] = -1
        try:
            with open(f"/proc/{tid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Tgid:"):
                        self.process_of[tid] = int(line.split()[1])
                        return
        except (OSError, ValueError):
            pass

    def processes(self) -> set[int]:
        return {p for p in self.process_of.values() if p > 0}

    def string(self, tid: int, addr: int) -> bytes | None:
        """The NUL-terminated string at ``addr`` in the caller's memory, opened
        again once if reading fails (the process may be gone, its pid reused);
        None when the caller is gone or the address is bad.  Raises Blind."""
        process = self.process_of.get(tid, -1)
        key = process if process > 0 else tid
        for fresh in (False, True):
            mem = self.mems.get(key, -1)
            if fresh or mem < 0:
                if mem >= 0:
                    os.close(mem)
                mem = self.mems[key] = self._open_mem(key)
                if mem < 0:
                    del self.mems[key]
                    return None  # the caller is gone
            found = kernel.read_string(mem, addr)
            if found is not None:
                return found
        return None

    def _open_mem(self, pid: int) -> int:
        if len(self.mems) > 64:  # processes come and go (children of QEMU)
            for fd in self.mems.values():
                os.close(fd)
            self.mems.clear()
        try:
            return os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            paths.blind_if_denied(f"/proc/{pid}/mem", exc)
            return -1
