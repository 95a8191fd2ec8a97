"""List the options QEMU's removed-features.rst says were removed, with the release.

Usage: extract_removed.py removed-features.rst SOURCE > removed-in-VERSION.txt
Only the "System emulator command line arguments" section; a heading may name several
options (``-portrait`` and ``-rotate``); sub-option headings (``-drive secs=s``) are skipped.
"""

from __future__ import annotations

import re
import sys

OPT = re.compile(r"``-{1,2}([A-Za-z0-9_-]+)``")
REMOVED = re.compile(r"\(removed in (\d+\.\d+)\)\s*$")

lines = open(sys.argv[1], encoding="utf-8").read().splitlines()
start = lines.index("System emulator command line arguments")
end = lines.index("User-mode emulator command line arguments")
print("# Options named in a heading of the 'System emulator command line arguments' section")
print("# of QEMU's docs/about/removed-features.rst, with the release that removed them.")
print(f"# source: {sys.argv[2]}")
print("# (a heading about one form of an option, like ``-drive secs=s``, is not counted)")
print("# name\tremoved_in")
seen: set[str] = set()
for i in range(start, end - 1):
    heading, underline = lines[i], lines[i + 1]
    if not underline or set(underline) != {"'"}:
        continue
    m = REMOVED.search(heading)
    if not m:
        continue
    # a heading about a sub-option (``-drive secs=s``, ``-numa`` node (...)) names a form,
    # not the option: keep only ``-opt`` tokens followed by nothing but "and", "option" or
    # the removal note, or that end the heading's prose ("... using ``-soundhw``").
    rest = REMOVED.sub("", heading)
    for name in OPT.findall(rest):
        token = f"``-{name}``" if f"``-{name}``" in rest else f"``--{name}``"
        after = rest.split(token, 1)[1].strip()
        if after and not after.startswith(("option", "and ``")):
            continue
        if name not in seen:
            seen.add(name)
            print(f"{name}\t{m.group(1)}")
