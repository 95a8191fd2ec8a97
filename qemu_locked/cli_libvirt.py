"""qemu-lockctl libvirt ...: put libvirt domains under qemu-locked and back."""

from __future__ import annotations

import typer

libvirt_app = typer.Typer(help="Put libvirt domains under qemu-locked (enable) and back (disable).")
