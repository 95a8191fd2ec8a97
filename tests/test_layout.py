"""The package's shape, pinned: layers without import cycles, small modules,
and a VM start path that imports only what it uses."""

from __future__ import annotations

import ast
import socket
import subprocess
import sys
from pathlib import Path

from conftest import QEMU_LOCKED, base_env, make_image

PKG = Path(__file__).resolve().parents[1] / "qemu_locked"
# Lowest first: a module may import its own layer and the ones before it.
LAYERS = ["model", "parse", "lock", "backends", "beside", "start", "admin", "demo"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every qemu_locked module this one imports, lazily or not (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def test_no_import_cycles_and_no_upward_imports() -> None:
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    upward = [f"{m} -> {t}" for m, ts in graph.items() for t in ts if _layer(t) > _layer(m) >= 0]
    assert upward == []
    # a cycle exists iff a depth-first walk meets a module still on its stack
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t) :] + [m, t]))
            elif t not in state:
                visit(t, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert cycles == []


def test_modules_stay_small() -> None:
    big = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert big == {}


def test_start_path_imports_only_what_it_uses(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img")
    # A syslog listening: the start's audit line (what it imports for it) is part of the start.
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log.bind(str(tmp_path / "log.sock"))
    env = base_env(
        QEMU_LOCKED_EMULATOR="/bin/true", QEMU_LOCKED_AUDIT_SOCKET=str(tmp_path / "log.sock")
    )
    r = subprocess.run(
        [sys.executable, "-X", "importtime", QEMU_LOCKED, "-name", "guest=x", "-drive", f"file={img}"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    log.settimeout(10)
    assert b"action=locked" in log.recv(4096)  # it wrote the line
    log.close()
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert "qemu_locked.start.wrapper" in imported  # the report is real
    heavy = {"typer", "lxml", "portalocker", "json", "re", "dataclasses", "enum", "hashlib"}
    assert imported & heavy == set()
    assert [m for m in imported if m.startswith("qemu_locked.admin")] == []
