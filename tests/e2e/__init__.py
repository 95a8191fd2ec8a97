"""End-to-end suite: a real libvirtd and QEMU, started and stopped by the harness (lab.py)."""
