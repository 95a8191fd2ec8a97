"""qemu-locked: disk-image locks for QEMU, held by the VM process itself.

Kept empty on purpose: ``qemu-locked`` runs before every VM start and must not
pay for imports it does not use.
"""

__version__ = "0.1.0"
