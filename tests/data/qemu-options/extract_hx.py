"""Extract every DEF(name, HAS_ARG|0, ...) of a QEMU qemu-options.hx.

Usage: extract_options.py HX VERSION SOURCE > VERSION.txt

Output: a header of '# ' lines (version, where the file came from), then one line per
option in file order: NAME<TAB>arg|none<TAB>ARCH_MASK<TAB>CONDITION (the enclosing
preprocessor condition, '-' if none).  The arch mask is what the DEF's last argument
says; whether a given binary accepts the option also depends on it.
"""

from __future__ import annotations

import re
import sys

DEF = re.compile(r'^DEF\("([^"]+)",\s*(HAS_ARG|0)\s*,\s*(QEMU_OPTION_\w+)')
ARCH = re.compile(r"(QEMU_ARCH_[A-Z0-9_| ]+?)\)\s*$")


def extract(text: str) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    cond: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if s.startswith("#if"):
            cond.append(s)
        elif s.startswith("#endif") and cond:
            cond.pop()
        elif s.startswith("#else") and cond:
            cond[-1] = "!(" + cond[-1] + ")"
        m = DEF.match(line)
        if m:
            # the arch mask ends the DEF: scan forward to the closing ')'
            j = i
            arch = "?"
            while j < len(lines) and j < i + 300:
                am = ARCH.search(lines[j])
                if am:
                    arch = am.group(1).replace(" ", "")
                    break
                j += 1
            rows.append(
                (
                    m.group(1),
                    "arg" if m.group(2) == "HAS_ARG" else "none",
                    arch,
                    " && ".join(cond) or "-",
                )
            )
        i += 1
    return rows


if __name__ == "__main__":
    hx, version, source = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(hx, encoding="utf-8") as f:
        rows = extract(f.read())
    out = sys.stdout
    out.write(f"# QEMU {version}: every DEF() of qemu-options.hx\n# source: {source}\n")
    out.write("# name\targ|none\tarch_mask\tpreprocessor condition\n")
    for row in rows:
        out.write("\t".join(row) + "\n")
