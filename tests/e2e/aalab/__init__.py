"""aalab: a real AppArmor host (Debian 12 cloud kernel) booted under QEMU TCG."""
