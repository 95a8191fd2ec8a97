"""A security module's refusal is never reported as a holder, nor as the file's
own permissions: one line naming the path and "denied by the host's security
policy", exit 6, nothing held, QEMU not run (issue 20, item 4).

The refusals are real: Landlock (this kernel's security module; AppArmor and
SELinux refuse the same way, EACCES on an access the modes allow) via
tests/landlocked.py.  Landlock does not mediate locks, so AppArmor's refused
'k' is the one errno injected (fail_closed.INJECT), with a real holder beside
it to show a conflict is still told from a refusal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QEMU_LOCKED, base_env, lock_free, make_image
from fail_closed import config, env_for, injected

from qemu_locked.lock import ofd

LANDLOCKED = str(Path(__file__).parent / "landlocked.py")
# The modules named are those /sys/kernel/security/lsm lists (Landlock? here),
# or the usual two where securityfs is not mounted (this container).
DENIED = "denied by the host's security policy ("


def landlocked(*rules: str) -> list[str]:
    return [sys.executable, LANDLOCKED, *rules, "--"]


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("qemu-locked: "), lines[0]
    assert "Traceback" not in r.stderr
    return lines[0]


def start(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def denied_dir(tmp_path: Path) -> Path:
    d = tmp_path / "denied"
    d.mkdir()
    return d


def test_an_image_open_refused_by_policy_is_exit_6_naming_it(denied_dir: Path) -> None:
    img = make_image(denied_dir / "d.img")
    os.chmod(img, 0o666)  # the modes allow it to anyone: only the policy refuses
    r = start(
        landlocked("--deny-write", str(denied_dir)) + [QEMU_LOCKED, "-drive", f"file={img}"],
        base_env(FAKE_QEMU_EXIT="0"),
    )
    line = one_line(r)
    assert r.returncode == 6, r.stderr
    assert line.startswith(f"qemu-locked: {img}: open for writing {DENIED}"), line
    assert line.endswith("?); `qemu-lockctl doctor` names the fix"), line
    assert lock_free(img)


def test_the_files_own_permissions_are_still_a_disk_error(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img")
    os.chmod(img, 0o444)
    env = base_env(FAKE_QEMU_EXIT="0")
    r = start(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", QEMU_LOCKED,
               "-drive", f"file={img}"], env)  # fmt: skip
    assert r.returncode == 1, r.stderr  # QEMU's own status for an image it cannot open
    assert "security policy" not in one_line(r)
    assert "Permission denied" in r.stderr


def test_a_lease_file_create_refused_by_policy_names_the_lockspace(
    tmp_path: Path, denied_dir: Path
) -> None:
    img = make_image(tmp_path / "d.img")
    env = env_for(config(tmp_path, backend="lockspace", lockspace_dir=str(denied_dir)))
    env["FAKE_QEMU_EXIT"] = "0"
    r = start(
        landlocked("--deny-write", str(denied_dir)) + [QEMU_LOCKED, "-drive", f"file={img}"], env
    )
    line = one_line(r)
    assert r.returncode == 6, r.stderr
    assert f": create {DENIED}" in line and str(denied_dir) in line, line
    assert list(denied_dir.iterdir()) == []  # nothing written behind it
    assert lock_free(img)


@pytest.mark.parametrize("backend", ["direct", "lockspace"])
def test_a_lock_refused_by_policy_is_not_a_holder(tmp_path: Path, backend: str) -> None:
    """AppArmor without 'k' answers F_OFD_SETLK with EACCES, which is also how
    POSIX may report a holder; the kernel's F_OFD_GETLK tells the two apart."""
    img = make_image(tmp_path / "d.img")
    (tmp_path / "ls").mkdir()
    env = env_for(config(tmp_path, backend=backend, lockspace_dir=str(tmp_path / "ls")))
    env["FAKE_QEMU_EXIT"] = "0"
    r = start(injected("all", "EACCES", "-name", "guest=g", "-drive", f"file={img}"), env)
    line = one_line(r)
    assert r.returncode == 6, r.stderr
    assert ": lock denied by the host's security policy" in line, line
    assert "is locked" not in line and "holder" not in line, line
    assert lock_free(img)


def test_eacces_with_a_real_holder_is_still_a_conflict(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img")
    holder = os.open(img, os.O_RDWR)
    try:
        assert ofd.try_lock(holder, True)
        env = base_env(FAKE_QEMU_EXIT="0")
        r = start(injected("all", "EACCES", "-drive", f"file={img}"), env)
        assert r.returncode == 3, r.stderr
        line = one_line(r)
        assert (
            f"pid {os.getpid()}" in line and f"cannot write {img}: in use (writing) by" in line
        ), line
    finally:
        os.close(holder)


def _holder(img: str) -> subprocess.Popen[str]:
    """Another process on this host holding the image exclusive."""
    code = (
        "import os,sys,time; from qemu_locked.lock import ofd; "
        f"fd=os.open({img!r}, os.O_RDWR); assert ofd.try_lock(fd, True); "
        "print('held', flush=True); time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "held\n"
    return p


@pytest.mark.parametrize(
    ("hidden", "said"),
    [
        ("locks", "denies it /proc/locks"),
        ("pid", "denies it other processes' /proc entries"),
        # Landlock's own ptrace scope: the fd listing is allowed, following an fd is
        # not (as AppArmor's ptrace rules between two domains' profiles, issue 20's lab)
        ("ptrace", "denies it other processes' /proc entries"),
    ],
)
def test_a_holder_hidden_by_policy_is_said_so_not_another_host(
    tmp_path: Path, hidden: str, said: str
) -> None:
    img = make_image(tmp_path / "d.img")
    holder = _holder(img)
    try:
        rules = {
            "locks": ["--deny-read", f"/proc/{holder.pid}", "--deny-read", "/proc/locks"],
            "pid": ["--deny-read", f"/proc/{holder.pid}"],
            "ptrace": [],
        }[hidden]
        r = start(landlocked(*rules) + [QEMU_LOCKED, "-drive", f"file={img}"],
                  base_env(FAKE_QEMU_EXIT="0"))  # fmt: skip
        assert r.returncode == 3, r.stderr
        line = one_line(r)
        assert "another host" not in line and "this user cannot read" not in line, line
        assert "by a holder this process cannot identify: the host's security policy (" in line
        assert f"?) {said}" in line, line
        assert "`qemu-lockctl status PATH` as root names it" in line
    finally:
        holder.kill()
        holder.wait()


def test_a_mount_table_the_policy_hides_is_an_error_not_host_local_keys(tmp_path: Path) -> None:
    """Found in the AppArmor lab: the lockspace backend's keys need the mount
    table; unreadable, they fell back to this host's names without a word."""
    img = make_image(tmp_path / "d.img")
    (tmp_path / "ls").mkdir()
    env = env_for(config(tmp_path, backend="lockspace", lockspace_dir=str(tmp_path / "ls")))
    env["FAKE_QEMU_EXIT"] = "0"
    r = start(
        landlocked("--deny-read", "/proc/self/mountinfo") + [QEMU_LOCKED, "-drive", f"file={img}"],
        env,
    )
    line = one_line(r)
    assert r.returncode == 6, r.stderr
    assert line.startswith(f"qemu-locked: /proc/self/mountinfo: read {DENIED}"), line
    assert lock_free(img)
