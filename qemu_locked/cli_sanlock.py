"""qemu-lockctl sanlock ...: set up sanlock lockspace and lease areas."""

from __future__ import annotations

import typer

sanlock_app = typer.Typer(help="sanlock backend set-up (init).")
