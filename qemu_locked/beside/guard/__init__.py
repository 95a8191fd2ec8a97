"""The QMP guard (docs/monitor-guard.md): a relay on libvirt's monitor that locks what
the commands it parses name.  Runs only with ``supervisor = false`` (a kernel
without seccomp user notification) and ``monitor_guard = true``."""
