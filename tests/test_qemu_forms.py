"""Issue 14's command-line forms, black box: the real QEMU decides what is valid, and
``qemu-lockctl plan --json`` and ``qemu-locked`` must agree with it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, QEMU_LOCKED, base_env

QEMU = shutil.which("qemu-system-x86_64")
if QEMU is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI: qemu-system-x86_64 must be installed (make test installs it)")
    pytest.skip("qemu-system-x86_64 not installed", allow_module_level=True)

pytestmark = pytest.mark.qemu
VM = ["-machine", "pc", "-accel", "tcg", "-display", "none", "-nodefaults", "-S", "-m", "16"]


def start(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], bool]:
    """Start with a QMP monitor on stdio.  QEMU greets only once every drive is open,
    so a greeting means it accepted the command line."""
    proc = subprocess.Popen(
        [*cmd, *VM, "-qmp", "stdio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",  # QEMU 7.2 prints garbage where it names a qemu.conf line
        env=env,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().startswith('{"QMP"')


def quit_(proc: subprocess.Popen[str]) -> tuple[str, str]:
    assert proc.stdin is not None
    if proc.poll() is None:
        proc.stdin.write('{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n')
        proc.stdin.flush()
    return proc.communicate(timeout=60)


def outcome(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """(exit status, stderr): 0 when it came up and was told to quit."""
    proc, _up = start(cmd, env)
    _out, err = quit_(proc)
    return proc.returncode, err


def real_env() -> dict[str, str]:
    assert QEMU is not None
    return base_env(QEMU_LOCKED_EMULATOR=QEMU)


def plan(*args: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """{image name: mode} of ``qemu-lockctl plan --json``."""
    p = subprocess.run(
        [QEMU_LOCKCTL, "plan", "--json", "--", *args],
        capture_output=True,
        text=True,
        env=env or real_env(),
    )
    assert p.returncode == 0, p.stderr
    return {Path(d["path"]).name: d["mode"] for d in json.loads(p.stdout)["disks"]}


@pytest.fixture
def imgs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("a.img", "base.img"):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "raw", str(tmp_path / name), "1M"], check=True
        )
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", "top.qcow2"],
        check=True,
        cwd=tmp_path,
    )
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", "deep.qcow2"],
        check=True,
        cwd=tmp_path,
    )
    (tmp_path / "x.cfg").write_text('[drive]\n  file = "a.img"\n  if = "none"\n  format = "raw"\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


# (arguments, {image: mode} the plan must show); QEMU accepts every one (checked too).
# Header backing files (base.img under top.qcow2) are read by check/run, not plan.
ACCEPTED = [
    (["-drive", "file=a.img,format=raw,if=none,file.locking=off"], {}),
    (["-blockdev", "file,filename=a.img,node-name=f0"], {"a.img": "exclusive"}),
    (["-drive", "file=top.qcow2,if=none,backing.node-name=mid"], {"top.qcow2": "exclusive"}),
    (["-drive", "file.filename=a.img,if=none"], {"a.img": "exclusive"}),
    (
        ["-drive", "if=none,driver=raw,file.driver=blkdebug,file.image.filename=a.img"],
        {"a.img": "exclusive"},
    ),
    (
        ["-drive", "if=none,driver=qcow2,file.filename=top.qcow2,backing.file.filename=base.img"],
        {"top.qcow2": "exclusive", "base.img": "shared"},
    ),
    (
        ["-drive", "if=none,driver=quorum,vote-threshold=1,children.0.file.filename=a.img"],
        {"a.img": "exclusive"},
    ),
    (
        [
            "-blockdev",
            "driver=qcow2,node-name=fmt,file.driver=file,file.node-name=file,file.filename=top.qcow2",
            "-blockdev",
            "driver=raw,node-name=raw,file=file",
        ],
        {"top.qcow2": "exclusive"},
    ),
    (["-drive", "file=a.img,format=raw,if=none,readonly=on,force-share=on"], {}),
    # QEMU's iotests: names for the header's chain, two levels down; raw over qcow2
    (
        ["-drive", "file=deep.qcow2,if=none,backing.backing.node-name=base"],
        {"deep.qcow2": "exclusive"},
    ),
    (
        ["-drive", "driver=raw,file.driver=qcow2,file.file.filename=top.qcow2,if=none"],
        {"top.qcow2": "exclusive"},
    ),  # fmt: skip
    (["-async-teardown", "-readconfig", "x.cfg"], {"a.img": "exclusive"}),
    (["--drive", "file=a.img,format=raw,if=none"], {"a.img": "exclusive"}),
    (["-name", "-drive", "-drive", "file=a.img,format=raw,if=none"], {"a.img": "exclusive"}),
]


@pytest.mark.parametrize(("args", "want"), ACCEPTED, ids=[" ".join(a) for a, _ in ACCEPTED])
def test_qemu_accepts_and_plan_agrees(imgs: Path, args: list[str], want: dict[str, str]) -> None:
    assert QEMU is not None
    rc, err = outcome([QEMU, *args])
    assert rc == 0, err
    assert plan(*args) == want


# Options of newer (and older) QEMUs than the one installed: their value is never an image.
NOT_IMAGES = [
    ["-run-with", "async-teardown=on"],  # 8.1+, libvirt 11's <async-teardown/>
    ["-shim", "/usr/share/shim/shimx64.efi"],  # 10.0+, libvirt 11's <os><shim>
    ["-realtime", "mlock=off"],  # up to 5.2, libvirt for QEMU < 3.1
    ["-tftp", "/srv/tftp"],
    ["-drive", "file=gluster://h/v/img,file.debug=4,if=none"],  # libvirt 7
]


@pytest.mark.parametrize("args", NOT_IMAGES, ids=[" ".join(a) for a in NOT_IMAGES])
def test_option_values_are_never_images(imgs: Path, args: list[str]) -> None:
    assert plan(*args, "-drive", "file=a.img,format=raw,if=none") == {"a.img": "exclusive"}


def test_force_share_reader_beside_a_writer_in_either_order(imgs: Path) -> None:
    w = ["-drive", "file=a.img,format=raw,if=none,id=w"]
    r = ["-drive", "file=a.img,format=raw,if=none,id=r,readonly=on,force-share=on"]
    for first, second in ((w, r), (r, w)):
        vm, up = start([QEMU_LOCKED, *first], real_env())
        try:
            assert up, vm.stderr.read() if vm.stderr else ""
            rc, err = outcome([QEMU_LOCKED, *second], real_env())
            assert rc == 0, err
        finally:
            quit_(vm)


def test_force_share_on_a_writable_image_is_refused_as_qemu_does(imgs: Path) -> None:
    args = ["-drive", "file=a.img,format=raw,if=none,force-share=on"]
    assert QEMU is not None
    rc, err = outcome([QEMU, *args])
    assert rc == 1 and "force-share=on can only be used with read-only images" in err
    r = subprocess.run([QEMU_LOCKED, *VM, *args], capture_output=True, text=True, env=real_env())
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "force-share=on can only be used with read-only images" in r.stderr


def test_two_vms_with_locking_off_run_side_by_side(imgs: Path) -> None:
    args = ["-drive", "file=a.img,format=raw,if=none,file.locking=off"]
    vm, up = start([QEMU_LOCKED, *args], real_env())
    try:
        assert up, vm.stderr.read() if vm.stderr else ""
        rc, err = outcome([QEMU_LOCKED, *args], real_env())
        assert rc == 0, err
        # honor_locking_off = false: our lock stays, the second VM is refused by it
        strict = real_env() | {"QEMU_LOCKED_HONOR_LOCKING_OFF": "false"}
        assert plan(*args, env=strict) == {"a.img": "exclusive"}
    finally:
        quit_(vm)


REJECTED = [
    ["-drive", "file=missing.img,if=none"],
    ["-drive", "file=a.img,format=raw,if=none,readonly=bogus"],
    ["-drive"],
    ["-no-such-option"],
]


@pytest.mark.parametrize("args", REJECTED, ids=[" ".join(a) for a in REJECTED])
def test_where_qemu_refuses_the_wrapper_exits_as_qemu(imgs: Path, args: list[str]) -> None:
    assert QEMU is not None
    rc, err = outcome([QEMU, *args])
    assert rc == 1, err
    r = subprocess.run([QEMU_LOCKED, *VM, *args], capture_output=True, text=True, env=real_env())
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("qemu-locked: ") and r.stderr.count("\n") == 1, r.stderr


# Runs in a private mount namespace: /etc gets an overlay whose upper layer holds
# /etc/qemu/qemu.conf, so neither the host's /etc nor other QEMUs see it.
_WITH_USER_CONFIG = """
import ctypes, os, sys
upper, work, conf = sys.argv[1:4]
libc = ctypes.CDLL(None, use_errno=True)
opts = f"lowerdir=/etc,upperdir={upper},workdir={work}".encode()
if libc.mount(b"overlay", b"/etc", b"overlay", 0, opts) != 0:
    sys.exit(f"overlay on /etc: {os.strerror(ctypes.get_errno())}")
os.makedirs("/etc/qemu", exist_ok=True)
with open("/etc/qemu/qemu.conf", "w") as f:
    f.write(conf)
os.execv(sys.argv[4], sys.argv[4:])
"""


def with_user_config(tmp: Path, conf: str, cmd: list[str]) -> list[str]:
    upper, work = tmp / "upper", tmp / "work"
    upper.mkdir(parents=True)
    work.mkdir()
    return ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c",
            _WITH_USER_CONFIG, str(upper), str(work), conf, *cmd]  # fmt: skip


def test_default_config_file_drives_are_read_unless_no_user_config(imgs: Path) -> None:
    assert QEMU is not None
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace")
    conf = f'[drive]\n  file = "{imgs}/missing.img"\n  if = "none"\n'
    # QEMU itself reads it: the missing image fails its start
    rc, err = outcome(with_user_config(imgs / "q", conf, [QEMU]))
    assert rc == 1 and "missing.img" in err
    conf = f'[drive]\n  file = "{imgs}/a.img"\n  format = "raw"\n  if = "none"\n'
    lockctl = [QEMU_LOCKCTL, "plan", "--json", "--", "-m", "16"]
    p = subprocess.run(
        with_user_config(imgs / "p", conf, lockctl), capture_output=True, text=True, env=real_env()
    )
    assert p.returncode == 0, p.stderr
    assert [Path(d["path"]).name for d in json.loads(p.stdout)["disks"]] == ["a.img"]
    p = subprocess.run(
        with_user_config(imgs / "n", conf, [*lockctl, "-no-user-config"]),
        capture_output=True,
        text=True,
        env=real_env(),
    )
    assert p.returncode == 0 and json.loads(p.stdout)["disks"] == [], p.stderr


IOTESTS = [
    ["-drive", "file=deep.qcow2,if=none,backing.backing.node-name=base"],
    ["-drive", "driver=raw,file.driver=qcow2,file.file.filename=top.qcow2,if=none"],
]


@pytest.mark.parametrize("args", IOTESTS, ids=[" ".join(a) for a in IOTESTS])
def test_qemu_locked_starts_what_qemus_own_tests_start(imgs: Path, args: list[str]) -> None:
    """Issue 21: the plan must never refuse a command line QEMU accepts."""
    rc, err = outcome([QEMU_LOCKED, *args], real_env())
    assert rc == 0, err
