"""One doctor finding: OK / WARN / FAIL, what was seen, how to fix it."""

from __future__ import annotations

from qemu_locked.model.value import frozen

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@frozen
class Finding:
    status: str  # OK | WARN | FAIL
    check: str
    message: str
    fix: str = ""

    def to_json_obj(self) -> dict[str, str]:
        return {
            "status": self.status,
            "check": self.check,
            "message": self.message,
            "fix": self.fix,
        }


__all__ = ["FAIL", "OK", "WARN", "Finding"]
