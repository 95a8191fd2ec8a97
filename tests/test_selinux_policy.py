"""The SELinux policy module (confinement/selinux): compiled for real by Debian's
reference-policy tool chain (selinux-policy-dev: its devel Makefile, m4,
checkmodule, semodule_package), then read back as CIL (semodule_unpackage,
checkmodule -b -C) to check that the rules the product needs are in the
compiled module, and that the ones it must never have are not.

Compiled, not loaded: nothing here runs it on an SELinux host.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import skip_unless_ci

REPO = Path(__file__).resolve().parents[1]
SOURCES = REPO / "confinement" / "selinux"
DEVEL = Path("/usr/share/selinux/devel/Makefile")
TOOLS = ("make", "m4", "gawk", "checkmodule", "semodule_package", "semodule_unpackage")

Sexp = str | list["Sexp"]


def _require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing or not DEVEL.is_file():
        skip_unless_ci(
            f"the reference-policy tool chain ({', '.join(missing) or DEVEL}; "
            "apt: selinux-policy-dev semodule-utils)"
        )


def build(directory: Path, name: str = "qemu_locked") -> subprocess.CompletedProcess[str]:
    """The documented build, `make -f /usr/share/selinux/devel/Makefile NAME.pp`."""
    # NAME: the devel Makefile reads it from /etc/selinux/config, which a host
    # without SELinux need not have; it only names the policy in messages.
    return subprocess.run(
        ["make", "-f", str(DEVEL), "NAME=default", f"{name}.pp"],
        cwd=directory, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _copy_sources(to: Path) -> Path:
    to.mkdir()
    for suffix in (".te", ".fc", ".if"):
        shutil.copy(SOURCES / f"qemu_locked{suffix}", to)
    return to


# -- the compiled module, read back ------------------------------------------


def parse_cil(text: str) -> list[Sexp]:
    """CIL's s-expressions (atoms, quoted strings, lists); ; comments dropped."""
    stack: list[list[Sexp]] = [[]]
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "(":
            stack.append([])
            i += 1
        elif c == ")":
            done = stack.pop()
            stack[-1].append(done)
            i += 1
        elif c.isspace():
            i += 1
        elif c == ";":
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif c == '"':
            end = text.index('"', i + 1)
            stack[-1].append(text[i + 1 : end])
            i = end + 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in '()";':
                j += 1
            stack[-1].append(text[i:j])
            i = j
    assert len(stack) == 1, "unbalanced CIL"
    return stack[0]


@dataclass
class Module:
    """What the compiled module says, by rule kind."""

    fc: str
    # (kind, source, target, class) -> {(permission, condition)}; condition is
    # "" for an unconditional rule, else the boolean's name (+ "!" when false).
    av: dict[tuple[str, str, str, str], set[tuple[str, str]]] = field(default_factory=dict)
    booleans: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, set[str]] = field(default_factory=dict)
    range_transitions: list[list[Sexp]] = field(default_factory=list)
    build_log: str = ""

    def perms(self, kind: str, src: str, tgt: str, cls: str, cond: str = "") -> set[str]:
        return {p for p, c in self.av.get((kind, src, tgt, cls), set()) if c == cond}

    def any_perms(self, kind: str, src: str, tgt: str, cls: str) -> set[str]:
        return {p for p, _c in self.av.get((kind, src, tgt, cls), set())}

    def allowed_targets(self, src: str) -> set[str]:
        return {t for (k, s, t, _c) in self.av if k == "allow" and s == src}


def _walk(mod: Module, stmts: list[Sexp], cond: str) -> None:
    for st in stmts:
        if not isinstance(st, list) or not st or not isinstance(st[0], str):
            continue
        head = st[0]
        if head in ("allow", "dontaudit", "auditallow") and len(st) == 4:
            src, tgt, body = st[1], st[2], st[3]
            assert isinstance(src, str) and isinstance(tgt, str) and isinstance(body, list)
            cls, perms = body
            assert isinstance(cls, str) and isinstance(perms, list)
            tgt = src if tgt == "self" else tgt
            bucket = mod.av.setdefault((head, src, tgt, cls), set())
            bucket.update((str(p), cond) for p in perms)
        elif head == "optional":
            _walk(mod, st[2:], cond)
        elif head == "booleanif":
            expr = st[1]
            name = expr[0] if isinstance(expr, list) and len(expr) == 1 else str(expr)
            for branch in st[2:]:
                if isinstance(branch, list) and branch and branch[0] in ("true", "false"):
                    mark = "" if branch[0] == "true" else "!"
                    _walk(mod, branch[1:], f"{name}{mark}")
        elif head == "boolean":
            mod.booleans[str(st[1])] = str(st[2])
        elif head == "typeattributeset" and st[1] != "cil_gen_require":
            members = st[2] if isinstance(st[2], list) else [st[2]]
            mod.attributes.setdefault(str(st[1]), set()).update(str(m) for m in members)
        elif head == "rangetransition":
            mod.range_transitions.append(st)


def read_back(pp: Path) -> Module:
    work = pp.parent
    subprocess.run(
        ["semodule_unpackage", str(pp), str(work / "out.mod"), str(work / "out.fc")],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    subprocess.run(
        ["checkmodule", "-b", "-C", "-M", "-o", str(work / "out.cil"), str(work / "out.mod")],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    mod = Module(fc=(work / "out.fc").read_text())
    _walk(mod, parse_cil((work / "out.cil").read_text()), "")
    return mod


@pytest.fixture(scope="module")
def module(tmp_path_factory: pytest.TempPathFactory) -> Module:
    """The module as shipped, built once for this file's tests."""
    _require_tools()
    work = _copy_sources(tmp_path_factory.mktemp("selinux") / "qemu_locked")
    out = build(work)
    assert out.returncode == 0, out.stdout + out.stderr
    pp = work / "qemu_locked.pp"
    assert pp.is_file() and pp.stat().st_size > 0
    mod = read_back(pp)
    mod.build_log = out.stdout + out.stderr
    return mod


# -- the rules ----------------------------------------------------------------


def test_the_wrapper_is_an_entry_point_of_svirt_t_and_libvirtd_may_run_it(module: Module) -> None:
    assert "qemu_locked_exec_t" in module.attributes["entry_type"]
    assert "qemu_locked_exec_t" in module.attributes["exec_type"]
    assert {"entrypoint", "read", "map", "execute"} <= module.perms(
        "allow", "svirt_t", "qemu_locked_exec_t", "file"
    )
    # the VM start (transition) and libvirt's capabilities probe (no transition)
    assert {"execute", "execute_no_trans", "read", "open"} <= module.perms(
        "allow", "virtd_t", "qemu_locked_exec_t", "file"
    )


def test_python_runs_in_svirt_t(module: Module) -> None:
    assert "execute_no_trans" in module.perms("allow", "svirt_t", "bin_t", "file")
    assert {"execute", "map"} <= module.perms("allow", "svirt_t", "lib_t", "file")
    assert {"execute", "map"} <= module.perms("allow", "svirt_t", "ld_so_t", "file")
    assert "read" in module.perms("allow", "svirt_t", "etc_t", "file")  # /etc/qemu-locked


def test_lease_files_are_created_opened_and_locked_never_removed(module: Module) -> None:
    files = module.perms("allow", "svirt_t", "qemu_locked_lockspace_t", "file")
    assert {"create", "open", "read", "write", "lock", "getattr", "setattr"} <= files
    assert not files & {"unlink", "rename", "link", "relabelfrom", "relabelto", "execute"}
    dirs = module.perms("allow", "svirt_t", "qemu_locked_lockspace_t", "dir")
    assert {"search", "open", "read", "add_name", "write"} <= dirs
    assert not dirs & {"remove_name", "rmdir", "create", "rename", "reparent"}
    assert {"search"} <= module.perms("allow", "svirt_t", "var_lib_t", "dir")
    # every VM opens the same leases: created at s0, not at the creator's categories
    assert ["rangetransition", "svirt_t", "qemu_locked_lockspace_t", "file",
            [["s0"], ["s0"]]] in module.range_transitions  # fmt: skip


def test_proc_sys_and_signals_the_helpers_need(module: Module) -> None:
    assert "read" in module.perms("allow", "svirt_t", "proc_t", "file")  # /proc/locks
    assert "read" in module.perms("allow", "svirt_t", "sysctl_kernel_t", "file")  # boot_id
    assert "read" in module.perms("allow", "svirt_t", "sysfs_t", "lnk_file")  # /sys/dev/block
    assert module.perms("allow", "svirt_t", "svirt_t", "process") == {"sigkill"}
    assert "connectto" in module.perms("allow", "svirt_t", "svirt_t", "unix_stream_socket")


def test_no_cross_vm_or_cross_domain_proc_read(module: Module) -> None:
    """Naming a holder in another VM is refused on purpose (qemu_locked.te):
    no MCS exemption, no rule on the domain attribute, nothing on another
    process but the dontaudit that keeps the walk quiet."""
    assert not module.allowed_targets("svirt_t") & {"domain", "virt_domain", "unconfined_t"}
    for attr, members in module.attributes.items():
        assert not (attr.startswith(("mcs", "mls")) and "svirt_t" in members), attr
    # an exemption interface (mcs_file_read_all...) is only a warning in this
    # policy: it would compile, do nothing, and mislead the reader
    assert "deprecated" not in module.build_log, module.build_log
    assert module.any_perms("allow", "svirt_t", "svirt_t", "file") == set()
    assert module.any_perms("allow", "svirt_t", "svirt_t", "dir") == set()
    assert "read" in module.perms("dontaudit", "svirt_t", "domain", "file")


def test_sanlock_only_behind_its_boolean_off_by_default(module: Module) -> None:
    assert module.booleans == {"qemu_locked_use_sanlock": "false"}
    assert module.perms("allow", "svirt_t", "sanlock_t", "unix_stream_socket") == set()
    assert module.perms(
        "allow", "svirt_t", "sanlock_t", "unix_stream_socket", "qemu_locked_use_sanlock"
    ) == {"connectto"}
    assert "write" in module.perms(
        "allow", "svirt_t", "sanlock_runtime_t", "sock_file", "qemu_locked_use_sanlock"
    )


def test_file_contexts(module: Module) -> None:
    lines = {tuple(ln.split()) for ln in module.fc.splitlines() if ln and not ln.startswith("#")}
    assert ("/usr/bin/qemu-locked", "--", "system_u:object_r:qemu_locked_exec_t:s0") in lines
    assert (
        "/var/lib/qemu-locked/lockspace(/.*)?",
        "system_u:object_r:qemu_locked_lockspace_t:s0",
    ) in lines


# -- the base policy, and the check itself --------------------------------------


def test_the_vm_template_already_lets_svirt_t_lock_its_images(tmp_path: Path) -> None:
    """svirt_t is virt_domain_template(svirt) in virt.te: a probe module built
    from the same template shows the lock permission on the VM's images (hence
    no rule for them in ours).  The probe also expands our interfaces."""
    _require_tools()
    work = _copy_sources(tmp_path / "probe")
    (work / "ql_probe.te").write_text(
        "policy_module(ql_probe, 1.0.0)\n"
        "virt_domain_template(ql_probe)\n"
        "type ql_probe_reader_t;\n"
        "qemu_locked_read_lockspace(ql_probe_reader_t)\n"
        "qemu_locked_manage_lockspace(ql_probe_reader_t)\n"
    )
    out = build(work, "ql_probe")
    assert out.returncode == 0, out.stdout + out.stderr
    probe = read_back(work / "ql_probe.pp")
    assert "lock" in probe.perms("allow", "ql_probe_t", "ql_probe_image_t", "file")
    assert "lock" in probe.perms("allow", "ql_probe_t", "ql_probe_image_t", "blk_file")
    reader = probe.perms("allow", "ql_probe_reader_t", "qemu_locked_lockspace_t", "file")
    assert {"read", "lock", "unlink"} <= reader


def test_a_broken_rule_fails_the_compile(tmp_path: Path) -> None:
    """The compile can fail: an unknown permission is caught, not ignored."""
    _require_tools()
    work = _copy_sources(tmp_path / "broken")
    with (work / "qemu_locked.te").open("a") as f:
        f.write("allow svirt_t qemu_locked_lockspace_t:file no_such_permission;\n")
    out = build(work)
    assert out.returncode != 0
    assert not (work / "qemu_locked.pp").exists()


def test_the_sources_carry_no_m4_quote_characters_in_comments() -> None:
    """m4 reads ` and ' as quotes: one in a comment inside a macro argument
    silently ends it (the build then fails far from the cause)."""
    for path in sorted(SOURCES.glob("qemu_locked.*")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            comment = line.partition("#")[2] if "#" in line else ""
            assert "`" not in comment and "'" not in comment, f"{path.name}:{n}: {line}"
