"""Hole 5: files QEMU opens that the command line does not name.

A qcow2 image with an external data file (qemu-img create -o data_file=...)
makes QEMU open that file read-write; its name is in a header extension.  And
a block driver the parser does not know may open its filename: refused by
default (unknown_drivers = "refuse"), or skipped on request.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from conftest import QEMU_LOCKCTL, QEMU_LOCKED, byte0_modes, make_image, skip_unless_ci, wait_for
from fail_closed import REAL_QEMU, FakeVM, env_for, qemu_img


def _data_file_image(tmp: Path, name: str = "vm") -> tuple[str, str]:
    img, raw = str(tmp / f"{name}.qcow2"), str(tmp / f"{name}.raw")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={raw}", img, "16M")
    return img, raw


def test_data_file_is_locked_exclusive(tmp_path: Path) -> None:
    img, raw = _data_file_image(tmp_path)
    env = env_for(None, QEMU_LOCKED_DOMAIN_LEASE="false")
    vm = FakeVM(tmp_path, "vm", ["-drive", f"file={img},format=qcow2"], env)
    try:
        assert vm.ready(), vm.stderr()
        assert byte0_modes(vm.proc.pid, img) == ["exclusive"]
        assert byte0_modes(vm.proc.pid, raw) == ["exclusive"]
    finally:
        vm.kill()


def test_data_file_of_a_backing_image_is_locked_shared(tmp_path: Path) -> None:
    """The chain goes through it: top -> base.qcow2 (backing) -> base.raw (its data file)."""
    base = str(tmp_path / "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path}/base.raw", base, "16M")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    env = env_for(None, QEMU_LOCKED_DOMAIN_LEASE="false")
    vm = FakeVM(tmp_path, "vm", ["-drive", f"file={top},format=qcow2"], env)
    try:
        assert vm.ready(), vm.stderr()
        assert byte0_modes(vm.proc.pid, top) == ["exclusive"]
        assert byte0_modes(vm.proc.pid, base) == ["shared"]
        assert byte0_modes(vm.proc.pid, str(tmp_path / "base.raw")) == ["shared"]
    finally:
        vm.kill()


def test_relative_data_file_is_relative_to_the_working_directory(tmp_path: Path) -> None:
    """QEMU (7.2, 10.0) opens a relative data file name from its working directory
    (not the image's, as for backing files): measured with qemu-io."""
    (tmp_path / "sub").mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=sub/x.raw",
                    "sub/a.qcow2", "16M"], cwd=tmp_path, check=True)  # fmt: skip
    env = env_for(None, QEMU_LOCKED_DOMAIN_LEASE="false", FAKE_QEMU_OUT=str(tmp_path / "vm.out"))
    vm = subprocess.Popen(
        [QEMU_LOCKED, "-drive", "file=sub/a.qcow2,format=qcow2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: (tmp_path / "vm.out").exists() or vm.poll() is not None, "start")
        wait_for(
            lambda: "ready" in (tmp_path / "vm.out").read_text() or vm.poll() is not None, "ready"
        )
        assert byte0_modes(vm.pid, str(tmp_path / "sub/x.raw")) == ["exclusive"]
    finally:
        vm.kill()
        vm.wait()


def test_plan_marks_and_check_names_the_data_file(tmp_path: Path) -> None:
    """plan touches no disk, so it marks the header read; check reads it."""
    img, raw = _data_file_image(tmp_path)
    args = ["--json", "--", "-drive", f"file={img}"]
    r = subprocess.run([QEMU_LOCKCTL, "plan", *args], env=env_for(None), capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (disk,) = json.loads(r.stdout)["disks"]
    assert disk["path"] == img and disk["probe_data_file"] is True
    r = subprocess.run([QEMU_LOCKCTL, "check", *args], env=env_for(None), capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    disks = {d["path"]: d["mode"] for d in json.loads(r.stdout)["disks"]}
    assert disks == {img: "exclusive", raw: "exclusive"}


def test_real_qemu_writes_the_data_file_we_lock(tmp_path: Path) -> None:
    """Real QEMU opens the data file read-write; a second VM on it is refused."""
    if not os.path.exists(REAL_QEMU):
        skip_unless_ci("qemu-system-x86_64 not installed (make test installs it)")
    img, raw = _data_file_image(tmp_path)
    env = env_for(None, QEMU_LOCKED_EMULATOR=REAL_QEMU, QEMU_LOCKED_DOMAIN_LEASE="false")
    qmp = tmp_path / "qmp.sock"
    vm = subprocess.Popen([QEMU_LOCKED, "-machine", "none", "-display", "none", "-nodefaults", "-S",
                           "-drive", f"file={img},if=none,format=qcow2,id=d0",
                           "-qmp", f"unix:{qmp},server=on,wait=off"],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_for(lambda: qmp.exists() or vm.poll() is not None, "QEMU up")
        assert vm.poll() is None
        fds = [os.readlink(f"/proc/{vm.pid}/fd/{n}") for n in os.listdir(f"/proc/{vm.pid}/fd")]
        assert raw in fds  # QEMU really opens it
        assert byte0_modes(vm.pid, raw) == ["exclusive"]
        two = subprocess.run([QEMU_LOCKED, "-machine", "none", "-display", "none", "-nodefaults",
                              "-S", "-drive", f"file={raw},if=none,format=raw"],
                             env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert two.returncode == 3, two.stderr
    finally:
        vm.send_signal(signal.SIGKILL)
        vm.wait()


def test_unknown_driver_with_a_filename_is_refused_by_default(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img")
    r = subprocess.run([QEMU_LOCKED, "-blockdev", f"driver=xyzzy,node-name=n0,filename={img}"],
                       env=env_for(None, FAKE_QEMU_EXIT="0"), capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("qemu-locked: ") and "xyzzy" in line and "unknown_drivers" in line


def test_unknown_driver_skip_is_explicit(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img")
    r = subprocess.run([QEMU_LOCKED, "-blockdev", f"driver=xyzzy,node-name=n0,filename={img}"],
                       env=env_for(None, FAKE_QEMU_EXIT="0", QEMU_LOCKED_UNKNOWN_DRIVERS="skip"),
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_header_names_from_qemu_img(tmp_path: Path) -> None:
    """parse/qcow2.py on headers qemu-img wrote: v3 with a backing file and a data
    file, v2 (compat=0.10: no header extensions) with a backing file only."""
    from qemu_locked.parse import qcow2

    base = str(tmp_path / "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    v3 = str(tmp_path / "v3.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             "-o", f"data_file={tmp_path}/v3 data,,file.raw", v3)  # fmt: skip
    v2 = str(tmp_path / "v2.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", base, "-F", "qcow2", v2)
    found = {}
    for path in (v3, v2, base):
        head = Path(path).read_bytes()
        found[path] = qcow2.names(head[: qcow2.cluster_size(head[:104])])
    assert found[v3] == qcow2.Names("base.qcow2", f"{tmp_path}/v3 data,file.raw")
    assert found[v2] == qcow2.Names(base, None)
    assert found[base] == qcow2.Names(None, None)
    assert qcow2.names(b"not a qcow2 image at all" * 10) is None


def test_unknown_driver_under_the_supervisor_is_not_refused(tmp_path: Path) -> None:
    """With the supervisor the command line no longer has to be understood to be
    safe: whatever that node opens is locked at QEMU's open (tests/test_supervisor.py)."""
    img = make_image(tmp_path / "d.img")
    r = subprocess.run([QEMU_LOCKED, "-blockdev", f"driver=xyzzy,node-name=n0,filename={img}"],
                       env=env_for(None, FAKE_QEMU_EXIT="0", QEMU_LOCKED_SUPERVISOR="true"),
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
