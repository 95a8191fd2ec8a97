"""qemu-lockctl: argument handling through typer's CliRunner, and the installed
command against real locks held by real processes (qemu-locked + the fake QEMU)."""

from __future__ import annotations

import calendar
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, VM, base_env, make_image, run, skip_unless_ci
from typer.testing import CliRunner

from qemu_locked.admin import cli, doctor
from qemu_locked.admin import run as run_cmd

DATA = Path(__file__).parent / "data"
runner = CliRunner()


def lockctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run([QEMU_LOCKCTL, *args], env=env)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """stderr is exactly one ``qemu-lockctl: `` line: never a traceback."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qemu-lockctl: "), proc.stderr
    return lines[0]


def domain(tmp_path: Path, name: str, disks: str) -> str:
    path = tmp_path / f"{name}.xml"
    path.write_text(
        f"<domain type='qemu'><name>{name}</name>"
        f"<uuid>00000000-0000-4000-8000-00000000000{len(name) % 10}</uuid>"
        f"<devices>{disks}</devices></domain>"
    )
    return str(path)


def file_disk(path: str, extra: str = "") -> str:
    return (
        f"<disk type='file' device='disk'><source file='{path}'/><target dev='vda'/>{extra}</disk>"
    )


@pytest.fixture
def images(tmp_path: Path) -> tuple[str, str]:
    return make_image(tmp_path / "a.img"), make_image(tmp_path / "b.img")


def started(start, *args: str) -> VM:  # type: ignore[no-untyped-def]
    vm: VM = start(*args)
    assert vm.started(), vm.stderr()
    return vm


# -- argument handling (in-process) ------------------------------------------------------


def test_plan_argv_json() -> None:
    result = runner.invoke(
        cli.app, ["plan", "--json", "--", "-name", "guest=w", "-drive", "file=/x/a.img"]
    )
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["guest"] == "w"
    assert obj["disks"] == [{"path": "/x/a.img", "key": None, "mode": "exclusive", "role": "writable",
                             "origin": "-drive file=/x/a.img", "probe_backing": True,
                             "probe_data_file": True}]  # fmt: skip


def test_plan_domain_table() -> None:
    result = runner.invoke(cli.app, ["plan", "--domain", str(DATA / "lab1.xml")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "guest lab1  uuid d676c928-04bf-457e-9df6-ef0e7d76dd83"
    header = lines[2]
    # KEY too where one of its devices exists on this machine (/dev/loop0)
    assert header.split()[:4] == ["MODE", "ROLE", "PATH", "ORIGIN"]
    # aligned: every row's PATH starts in the header's PATH column
    col = header.index("PATH")
    for row in lines[3:12]:
        assert row[col - 2 : col] == "  " and row[col] == "/", row
    assert "libvirt <lease>: not used by qemu-locked" in result.stdout


def test_plan_applies_config_roles() -> None:
    args = [
        "plan",
        "--json",
        "--",
        "-drive",
        "file=/x/a.img",
        "-drive",
        "file=/x/ro.img,readonly=on",
    ]
    result = runner.invoke(cli.app, args, env=base_env(QEMU_LOCKED_READONLY="none"))
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert [d["path"] for d in obj["disks"]] == ["/x/a.img"]
    assert obj["skipped"] == [
        {"source": "/x/ro.img", "reason": 'readonly disk: not locked (config readonly = "none")',
         "network": False}
    ]  # fmt: skip


def test_plan_from_stdin() -> None:
    result = runner.invoke(
        cli.app, ["plan", "--json", "--domain", "-"], input=(DATA / "lab1.xml").read_text()
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["guest"] == "lab1"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan"], "nothing to plan"),
        (["plan", "--domain", "x.xml", "--", "-hda", "a"], "either --domain or QEMU arguments"),
        (["check"], "nothing to plan"),
        (["run", "--disk", "/x"], "nothing to run"),
        (["run", "--", "true"], "nothing to lock"),
        (["run", "--disk", "/x", "--domain", "d.xml", "--", "true"], "either --domain or --disk"),
        (["run", "--disk", ":shared", "--", "true"], "no path"),
    ],
)
def test_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qemu-lockctl: ") and message in err


@pytest.mark.parametrize("args", [["plan", "--bogus"], ["run", "--wait", "-1", "--disk", "/x", "--", "true"],
                                  ["run", "--wait", "soon", "--disk", "/x", "--", "true"], ["nosuch"]])  # fmt: skip
def test_click_errors_are_one_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qemu-lockctl: "), err


def test_runner_sees_errors_as_exceptions() -> None:
    """Under CliRunner the command raises our error (main() turns it into a line)."""
    result = runner.invoke(cli.app, ["plan", "--domain", str(DATA / "xxe.xml")])
    assert result.exit_code != 0
    assert "DOCTYPE declares entities" in str(result.exception)


def test_a_bug_is_one_line_exit_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qemu_locked.admin import status

    def broken(*_a: object) -> list[dict[str, object]]:
        raise RuntimeError("boom")

    monkeypatch.setattr(status, "status_rows", broken)
    with pytest.raises(SystemExit) as exc:
        cli.main(["status"])
    assert exc.value.code == 70
    assert capsys.readouterr().err == "qemu-lockctl: internal error: RuntimeError: boom\n"


def test_disk_specs() -> None:
    p = run_cmd.disk_plan(["/a:shared", "/b", "/c:exclusive", "/d:weird", "/a"])
    assert [(d.path, d.mode) for d in p.disks] == [
        ("/a", "exclusive"), ("/b", "exclusive"), ("/c", "exclusive"), ("/d:weird", "exclusive")
    ]  # fmt: skip
    assert run_cmd.disk_plan(["/a:shared"]).disks[0].mode == "shared"


def test_help_documents_exit_codes() -> None:
    for command in ("plan", "check", "status", "run", "doctor"):
        result = runner.invoke(cli.app, [command, "--help"])
        assert result.exit_code == 0
        assert "Exit codes" in result.stdout, command


# -- bad input through the installed command ------------------------------------------------


@pytest.mark.parametrize("name", ["bomb.xml", "xxe.xml", "xxe-parameter.xml"])
def test_hostile_xml_one_line_exit_2(name: str) -> None:
    for command in ("plan", "check"):
        proc = lockctl(command, "--domain", str(DATA / name))
        assert proc.returncode == 2
        assert "DOCTYPE declares entities; refused" in one_error_line(proc)


def test_huge_xml_one_line_exit_2(tmp_path: Path) -> None:
    huge = tmp_path / "huge.xml"
    with open(huge, "wb") as f:
        f.write(b"<domain><name>x</name><description>")
        f.truncate(11 << 20)
    proc = lockctl("plan", "--domain", str(huge))
    assert proc.returncode == 2
    assert "larger than 10 MiB" in one_error_line(proc)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read: No such file or directory"), ("<domain>", "not valid XML"),
     ("<pool/>", "not a libvirt domain XML")],
)  # fmt: skip
def test_bad_domain_files(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "d.xml"
    if content is not None:
        path.write_text(content)
    proc = lockctl("check", "--domain", str(path))
    assert proc.returncode == 2
    assert message in one_error_line(proc)


def test_unreadable_domain_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.xml"
    path.write_text("<domain/>")
    path.chmod(0)
    # Root reads any file: as root, ask as 'nobody' (the way libvirt-qemu would run it).
    as_user = {"user": 65534} if os.getuid() == 0 else {}
    if as_user:
        tmp_path.chmod(0o755)
    proc = run([QEMU_LOCKCTL, "plan", "--domain", str(path)], env=base_env(), **as_user)
    assert proc.returncode == 2 and "Permission denied" in one_error_line(proc)


# -- check --------------------------------------------------------------------------------


def test_check_exit_codes(start, images: tuple[str, str]) -> None:  # type: ignore[no-untyped-def]
    a, b = images
    proc = lockctl("check", "--", "-drive", f"file={a},format=raw")
    assert (proc.returncode, proc.stdout) == (0, "ok: 1 disk free (backend direct)\n")
    vm = started(start, "-name", "guest=web", "-drive", f"file={a},format=raw",
                 "-drive", f"file={b},format=raw,readonly=on")  # fmt: skip
    held = lockctl(
        "check", "--", "-drive", f"file={a},format=raw", "-drive", f"file={b},format=raw"
    )
    assert held.returncode == 1, held.stderr
    lines = held.stdout.splitlines()
    assert lines[0].split() == ["RESOURCE", "WANTED", "HELD"]
    assert lines[1].split()[:5] == [a, "write", "in", "use", "(writing)"]
    assert f"pid {vm.proc.pid}, guest 'web'" in lines[1]
    assert lines[2].split()[:5] == [b, "write", "in", "use", "(sharing)"]
    # a shared use of the read-only disk is fine next to the VM's shared lock
    assert lockctl("check", "--", "-drive", f"file={b},format=raw,readonly=on").returncode == 0
    vm.kill()
    assert lockctl("check", "--", "-drive", f"file={a},format=raw").returncode == 0


def test_check_json_names_holders(start, images: tuple[str, str], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, _b = images
    vm = started(start, "-name", "guest=db", "-uuid", "5a1e0000-0000-4000-8000-000000000001",
                 "-drive", f"file={a},format=raw")  # fmt: skip
    xml = domain(tmp_path, "other", file_disk(a))
    proc = lockctl("check", "--json", "--domain", xml)
    assert proc.returncode == 1
    obj = json.loads(proc.stdout)
    assert obj["ok"] is False and obj["guest"] == "other"
    (conflict,) = obj["conflicts"]
    assert conflict["path"] == a and conflict["wanted"] == "exclusive"
    assert [(h["pid"], h["guest"], h["uuid"]) for h in conflict["holders"]] == [
        (vm.proc.pid, "db", "5a1e0000-0000-4000-8000-000000000001")
    ]


def test_domain_lease_counts_in_check_and_run(
    start, images: tuple[str, str], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The same VM (uuid) must not run twice, even on other disks: check and run see the
    domain lease that qemu-locked keeps when a lockspace directory exists."""
    a, b = images
    lockspace = tmp_path / "lockspace"
    lockspace.mkdir()
    env = base_env(QEMU_LOCKED_LOCKSPACE_DIR=str(lockspace))
    uuid = "00000000-0000-4000-8000-000000000004"  # domain() gives "twin" this uuid
    vm = start("-name", "guest=twin", "-uuid", uuid, "-drive", f"file={a},format=raw", env=env)
    assert vm.started(), vm.stderr()
    xml = domain(tmp_path, "twin", file_disk(b))
    proc = lockctl("check", "--domain", xml, env=env)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines()[1].split()[:6] == ["domain", uuid, "start", "in", "use",
                                                        "(writing)"]  # fmt: skip
    assert f"pid {vm.proc.pid}" in proc.stdout
    assert lockctl("run", "--domain", xml, "--", "true", env=env).returncode == 3
    vm.kill()
    assert lockctl("run", "--domain", xml, "--", "true", env=env).returncode == 0


def test_check_missing_disk_is_exit_4(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.img")
    proc = lockctl("check", "--domain", domain(tmp_path, "m", file_disk(missing)))
    assert proc.returncode == 4
    assert f"{missing}: No such file or directory" in one_error_line(proc)
    assert not os.path.exists(missing)  # never created


# -- status -------------------------------------------------------------------------------


def test_status_finds_holders_by_pid_and_guest(start, images: tuple[str, str]) -> None:  # type: ignore[no-untyped-def]
    a, b = images
    vm = started(start, "-name", "guest=status-vm", "-uuid", "5a1e0000-0000-4000-8000-000000000002",
                 "-drive", f"file={a},format=raw", "-drive", f"file={b},format=raw,readonly=on")  # fmt: skip
    proc = lockctl("status", "--json")
    assert proc.returncode == 0, proc.stderr
    mine = [r for r in json.loads(proc.stdout)["locks"] if r["pid"] == vm.proc.pid]
    assert sorted((r["path"], r["mode"], r["guest"]) for r in mine) == [
        (a, "exclusive", "status-vm"), (b, "shared", "status-vm")
    ]  # fmt: skip
    for r in mine:
        assert r["uuid"] == "5a1e0000-0000-4000-8000-000000000002"
        assert r["host"] == os.uname().nodename
        assert (
            abs(time.time() - calendar.timegm(time.strptime(r["since"], "%Y-%m-%dT%H:%M:%SZ")))
            < 120
        )
    table = lockctl("status", a).stdout.splitlines()
    assert table[0].split() == ["MODE", "PID", "GUEST", "COMMAND", "UUID", "SINCE", "HOST", "PATH"]
    assert len(table) == 2 and table[1].split()[:3] == ["writing", str(vm.proc.pid), "status-vm"]
    assert table[1].endswith(a)
    vm.kill()
    assert json.loads(lockctl("status", "--json", a, b).stdout) == {"locks": [], "unlisted": []}
    assert lockctl("status", a).stdout == "no lock held\n"


def test_status_of_missing_path(tmp_path: Path) -> None:
    proc = lockctl("status", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "No such file" in one_error_line(proc)


# -- run ----------------------------------------------------------------------------------

CHILD = "import sys; print('ready', flush=True); sys.stdin.read()"


def test_run_holds_the_lock_for_the_commands_life(images: tuple[str, str], tmp_path: Path) -> None:
    a, b = images
    proc = subprocess.Popen(
        [QEMU_LOCKCTL, "run", "--disk", a, "--disk", f"{b}:shared", "--", sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        # exec kept the pid: the command itself holds the locks
        rows = json.loads(lockctl("status", "--json", a, b).stdout)["locks"]
        assert sorted((r["path"], r["mode"], r["pid"]) for r in rows) == [
            (a, "exclusive", proc.pid), (b, "shared", proc.pid)
        ]  # fmt: skip
        assert lockctl("check", "--", "-drive", f"file={a},format=raw").returncode == 1
        assert lockctl("check", "--", "-drive", f"file={b},format=raw,readonly=on").returncode == 0
        xml = domain(tmp_path, "needs-a", file_disk(a))
        assert lockctl("run", "--domain", xml, "--", "true").returncode == 3
    finally:
        proc.communicate("", timeout=20)
    assert proc.returncode == 0
    assert lockctl("check", "--", "-drive", f"file={a},format=raw").returncode == 0


def test_run_exit_status_is_the_commands(images: tuple[str, str], tmp_path: Path) -> None:
    a, _b = images
    xml = domain(tmp_path, "r", file_disk(a))
    proc = lockctl("run", "--domain", xml, "--", sys.executable, "-c", "import sys; sys.exit(7)")
    assert proc.returncode == 7
    # options after the command belong to the command
    proc = lockctl("run", "--disk", a, "--", "echo", "--wait", "-x")
    assert (proc.returncode, proc.stdout) == (0, "--wait -x\n")


def test_run_missing_or_not_executable(images: tuple[str, str], tmp_path: Path) -> None:
    a, _b = images
    proc = lockctl("run", "--disk", a, "--", "no-such-command-qemu-locked")
    assert proc.returncode == 127 and "command not found" in one_error_line(proc)
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    proc = lockctl("run", "--disk", a, "--", str(script))
    assert proc.returncode == 126 and "Permission denied" in one_error_line(proc)
    proc = lockctl("run", "--disk", str(tmp_path / "nope.img"), "--", "true")
    assert proc.returncode == 4 and not (tmp_path / "nope.img").exists()


def test_run_wait_shows_holders_then_takes_the_lock(start, images: tuple[str, str]) -> None:  # type: ignore[no-untyped-def]
    a, _b = images
    vm = started(start, "-name", "guest=blocker", "-drive", f"file={a},format=raw")
    waiter = subprocess.Popen(
        [QEMU_LOCKCTL, "run", "--wait", "30", "--disk", a, "--", sys.executable, "-c", "print('got it')"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env(),
    )  # fmt: skip
    assert waiter.stderr is not None
    first = waiter.stderr.readline()
    assert first.startswith("qemu-lockctl: waiting 0/30s: ")
    assert f"cannot write {a}: in use (writing) by pid {vm.proc.pid}, guest 'blocker'" in first
    vm.kill()
    out, err = waiter.communicate(timeout=30)
    assert (waiter.returncode, out) == (0, "got it\n"), err


def test_run_wait_times_out_with_exit_3(start, images: tuple[str, str]) -> None:  # type: ignore[no-untyped-def]
    a, _b = images
    started(start, "-name", "guest=stays", "-drive", f"file={a},format=raw")
    t0 = time.monotonic()
    proc = lockctl("run", "--wait", "1.5", "--disk", a, "--", "true")
    assert proc.returncode == 3
    assert 1.4 < time.monotonic() - t0 < 10
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("qemu-lockctl: waiting 0/1.5s: ") and "guest 'stays'" in lines[0]
    assert (
        lines[-1]
        == f"qemu-lockctl: cannot write {a}: in use (writing) by pid {lines[0].split('pid ')[1].split(',')[0]}, guest 'stays'"
    )


def test_ctrl_c_while_waiting_leaves_nothing_held(start, images: tuple[str, str]) -> None:  # type: ignore[no-untyped-def]
    a, b = images
    # b is free and comes first or second in lock order: either way it must not stay held
    vm = started(start, "-name", "guest=hold-a", "-drive", f"file={a},format=raw")
    # A shell without job control starts background commands with SIGINT ignored
    # (POSIX), and an ignored SIGINT is inherited: Ctrl-C comes from a terminal to a
    # process whose SIGINT is at its default.  A handler (unlike SIG_IGN) is reset to
    # the default by exec, so the waiter gets that while this one is installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        waiter = subprocess.Popen(
            [QEMU_LOCKCTL, "run", "--wait", "60", "--disk", a, "--disk", b, "--", "true"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env(),
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    assert waiter.stderr is not None
    assert "waiting" in waiter.stderr.readline()  # the event: it is waiting on a
    waiter.send_signal(signal.SIGINT)
    _out, err = waiter.communicate(timeout=20)
    assert (
        waiter.returncode == 130
        and err.splitlines()[-1] == "qemu-lockctl: interrupted; no lock is held"
    )
    rows = json.loads(lockctl("status", "--json", a, b).stdout)["locks"]
    assert [(r["path"], r["pid"]) for r in rows] == [(a, vm.proc.pid)]


# -- doctor -------------------------------------------------------------------------------


def findings(proc: subprocess.CompletedProcess[str]) -> list[dict[str, str]]:
    obj = json.loads(proc.stdout)
    assert obj["ok"] is (proc.returncode == 0)
    return obj["findings"]  # type: ignore[no-any-return]


def test_doctor_good_directory(tmp_path: Path) -> None:
    proc = lockctl("doctor", "--json", "--path", str(tmp_path))
    (f,) = [f for f in findings(proc) if f["check"] == f"ofd-locks {tmp_path}"]
    assert f["status"] == "OK" and "OFD byte-0 locks work" in f["message"]
    assert os.listdir(tmp_path) == []  # the test file is gone
    emulator = [f for f in findings(proc) if f["check"] == "emulator"]
    assert emulator[0]["status"] == "OK"


def test_doctor_flags_a_file_posing_as_a_directory(tmp_path: Path) -> None:
    bogus = tmp_path / "images"
    bogus.write_text("")
    proc = lockctl("doctor", "--path", str(bogus))
    assert proc.returncode == 1
    row = next(line for line in proc.stdout.splitlines() if line.startswith("FAIL"))
    assert f"{bogus} is not a directory" in row
    assert "fix: replace it with a directory" in proc.stdout


def test_doctor_flags_a_broken_lockspace(tmp_path: Path) -> None:
    lockspace = tmp_path / "lockspace"
    lockspace.write_text("not a directory")
    config = tmp_path / "qemu-locked.toml"
    config.write_text(f'backend = "lockspace"\nlockspace_dir = "{lockspace}"\n')
    env = base_env(QEMU_LOCKED_CONFIG=str(config))
    proc = lockctl("doctor", "--json", env=env)
    assert proc.returncode == 1
    # (the config under pytest's 0700 tmp_path is a FAIL of its own for libvirt-qemu)
    bad = {f["check"]: f for f in findings(proc) if f["status"] == "FAIL"}
    assert "is not a directory" in bad["ofd-locks lockspace"]["message"]
    assert bad["ofd-locks lockspace"]["fix"]


def test_doctor_flags_a_lockspace_the_qemu_user_cannot_write(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    user = doctor.User.lookup(doctor.QEMU_USER)
    if user is None or os.getuid() != 0:
        skip_unless_ci("needs the libvirt-qemu user and root to own the directory")
    # pytest's own tmp_path sits in a 0700 directory: use one libvirt-qemu can reach
    top = Path(tempfile.mkdtemp(prefix="qemu-lockctl-test-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(top, ignore_errors=True))
    top.chmod(0o755)
    lockspace = top / "lockspace"
    lockspace.mkdir(mode=0o700)
    config = top / "qemu-locked.toml"
    config.write_text(f'backend = "lockspace"\nlockspace_dir = "{lockspace}"\n')
    proc = lockctl("doctor", "--json", env=base_env(QEMU_LOCKED_CONFIG=str(config)))
    assert proc.returncode == 1
    bad = [f for f in findings(proc) if f["status"] == "FAIL"]
    assert [f["check"] for f in bad] == ["lockspace", "start as libvirt-qemu"]
    bad = bad[0]
    assert "not rwx for libvirt-qemu" in bad["message"]
    assert bad["fix"] == "qemu-lockctl lockspace init"
    lockspace.chmod(0o777)
    ok = lockctl("doctor", "--json", env=base_env(QEMU_LOCKED_CONFIG=str(config)))
    assert next(f for f in findings(ok) if f["check"] == "lockspace")["status"] == "OK"


def test_doctor_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('backend = "carrier-pigeon"\n')
    proc = lockctl("doctor", "--json", env=base_env(QEMU_LOCKED_CONFIG=str(config)))
    assert proc.returncode == 1
    assert findings(proc)[0]["status"] == "FAIL" and "backend" in findings(proc)[0]["message"]


def test_doctor_ofd_check_refuses_a_second_open(tmp_path: Path) -> None:
    """The doctor's probe itself: OK on a real filesystem, FAIL when a lock attempt
    fails for a reason other than contention (errno injected: no such filesystem here)."""
    assert doctor.check_ofd(str(tmp_path), "t").status == "OK"
    import errno
    from unittest import mock

    from qemu_locked.lock import ofd

    def no_locks(fd: int, exclusive: bool) -> bool:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    with mock.patch.object(ofd, "try_lock", no_locks):
        f = doctor.check_ofd(str(tmp_path), "t")
    assert f.status == "FAIL" and "OFD lock refused" in f.message
    assert os.listdir(tmp_path) == []


def test_libvirt_lockd_setting_is_flagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('# lock_manager = "sanlock"\nlock_manager = "lockd"  # on\n')
    from qemu_locked.admin import doctor_libvirt, vmuser

    monkeypatch.setattr(vmuser, "LIBVIRT_QEMU_CONF", str(conf))
    monkeypatch.setattr(vmuser, "LIBVIRT_LOCKD_CONF", str(tmp_path / "absent.conf"))
    monkeypatch.setattr(doctor_libvirt, "LIBVIRT_DOMAINS", str(tmp_path / "domains"))
    out, _user = doctor_libvirt.check_libvirt()
    # no domain runs qemu-locked yet: a warning (a FAIL once one does: test_doctor_as_vm_user)
    assert out[0].status == "WARN" and "virtlockd locks byte 0" in out[0].message
    (tmp_path / "absent.conf").write_text('file_lockspace_dir = "/var/lib/libvirt/lockd/files"\n')
    out, _user = doctor_libvirt.check_libvirt()
    assert out[0].status == "OK"


def test_ofd_portalocker_face(tmp_path: Path) -> None:
    """portalocker's Lock over our OFD locker: two opens in one process conflict (OFD
    semantics), the timeout retries, shared locks coexist, and no path is ever created."""
    import portalocker

    from qemu_locked.lock.ofd_portalocker import NON_BLOCKING, SHARED, OFDLock

    image = make_image(tmp_path / "img")
    first = OFDLock(image)
    first.acquire()
    t0 = time.monotonic()
    with pytest.raises(portalocker.AlreadyLocked):
        OFDLock(image, timeout=0.3, check_interval=0.05).acquire()
    assert 0.25 < time.monotonic() - t0 < 5
    with pytest.raises(portalocker.AlreadyLocked):
        OFDLock(image, flags=SHARED | NON_BLOCKING).acquire()
    rows = json.loads(lockctl("status", "--json", image).stdout)["locks"]
    assert [(r["mode"], r["pid"]) for r in rows] == [("exclusive", os.getpid())]
    first.release()
    a, b = OFDLock(image, flags=SHARED | NON_BLOCKING), OFDLock(image, flags=SHARED | NON_BLOCKING)
    a.acquire()
    b.acquire()
    a.release()
    b.release()
    with pytest.raises(FileNotFoundError):
        OFDLock(str(tmp_path / "absent")).acquire()
    assert not (tmp_path / "absent").exists()


def test_libvirt_enable_checks_the_wrapper_the_qemu_user_must_run(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """--emulator must be an executable the QEMU user can run, else enable refuses."""
    from qemu_locked.admin.libvirt import check_wrapper
    from qemu_locked.model.errors import UsageError

    with pytest.raises(UsageError, match="--emulator relative: must be an absolute path"):
        check_wrapper("relative")
    with pytest.raises(UsageError, match="No such file"):
        check_wrapper(str(tmp_path / "absent"))
    if doctor.User.lookup(doctor.QEMU_USER) is None or os.getuid() != 0:
        skip_unless_ci("needs the libvirt-qemu user (libvirt-daemon-system) and root")
    top = Path(tempfile.mkdtemp(prefix="qemu-lockctl-wrapper-", dir="/tmp"))
    top.chmod(0o755)  # reachable, so the private directory below is what blocks
    hidden = top / "private"
    hidden.mkdir(mode=0o700)
    launcher = hidden / "qemu-locked"
    launcher.write_text("#!/usr/bin/python3 -IS\n")
    launcher.chmod(0o755)
    with pytest.raises(UsageError, match=f"{hidden} is not searchable .x. by libvirt-qemu"):
        check_wrapper(str(launcher))
