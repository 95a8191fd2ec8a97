"""``python3 -m qemu_locked.admin`` is ``qemu-lockctl`` (the package build uses it
before any script is installed)."""

from qemu_locked.admin.cli import main

main()
