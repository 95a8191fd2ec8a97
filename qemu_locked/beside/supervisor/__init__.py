"""The supervisor: the kernel's word on every file QEMU opens (seccomp user notification).

A process beside QEMU holding the listener of a seccomp filter the wrapper
installs on itself just before exec: QEMU, its threads and its children wait
in each ``open``/``openat``/``creat`` until the supervisor has answered.  A
disk image is opened by the supervisor, locked through the configured backend
(the monitor guard's Locks: their fds are the carriers, and a copy of each is
planted in QEMU), and the fd injected as the call's result; every other file
passes straight through.  Modules: kernel (the seccomp interface), paths (what
QEMU named, resolved as QEMU would), loop (one handler per trapped syscall,
the release sweep), start (the wrapper's side).  docs/supervisor.md says what
it sees and what it does not.
"""
