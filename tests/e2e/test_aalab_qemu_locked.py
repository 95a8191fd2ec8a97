"""qemu-locked on a real AppArmor host (issue 20): a Debian 12 guest with its own
kernel enforcing AppArmor, libvirt 9.0 and QEMU 7.2 (tests/e2e/aalab), the .deb this
tree builds installed with dpkg, driven by tests/e2e/aalab/scenario_qemu_locked.py.

One boot (~3 min under TCG) runs the whole story; each test reads one part of it:
before `libvirt enable` the wrapper cannot even be executed and doctor says why;
after it, starts, refusals naming the holder, a refused hot-plug and the admin's
views work as root and as the VM user, also with Yama's ptrace_scope = 1, with
not one apparmor="DENIED" line; disable --all and purge take the rules out.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.aalab import image, vm

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]
SCENARIO = Path(__file__).parent / "aalab" / "scenario_qemu_locked.py"
LOCAL = "/etc/apparmor.d/local/abstractions/libvirt-qemu"


@pytest.fixture(scope="module")
def result(
    aalab_paths: image.Paths, deb_package: Path, tmp_path_factory: pytest.TempPathFactory
) -> vm.Result:
    work = tmp_path_factory.mktemp("aalab-qemu-locked")
    payload = vm.Payload(work / "payload")
    payload.add_file("qemu-locked.deb", deb_package, 0o644)
    payload.add_file("run", SCENARIO, 0o755)
    return vm.boot(payload, timeout=900, workdir=work, paths=aalab_paths)


def test_before_enable_doctor_fails_and_the_start_is_denied_as_reported(result: vm.Result) -> None:
    result.passed("install")
    doctor = result.passed("doctor-before")["doctor"]
    line = next(ln for ln in doctor.splitlines() if ln.startswith("FAIL") and "apparmor" in ln)
    assert "denies every start through /usr/bin/qemu-locked" in line, doctor
    denied = result.passed("denied-without-rules")
    assert "cannot execute binary /usr/bin/qemu-locked: Permission denied" in denied["stderr"]


def test_enable_puts_the_rules_in_a_marked_block_and_doctor_passes(result: vm.Result) -> None:
    enabled = result.passed("enable")
    assert f"AppArmor: added qemu-locked's rules in {LOCAL} (a marked block)" in enabled["stdout"]
    assert "include if exists <abstractions/qemu-locked>" in enabled["block"]
    doctor = result.passed("doctor-after")["doctor"]
    assert "libvirt's domain profiles include qemu-locked's rules" in doctor, doctor


def test_qemu_runs_confined_with_its_supervisor(result: vm.Result) -> None:
    started = result.passed("start-aa1")
    assert started["label"] == started["expected"]
    assert started["exe"] == "/usr/bin/qemu-system-x86_64"
    supervisors: dict[str, str] = started["supervisors"]
    assert supervisors and set(supervisors.values()) == {started["expected"]}, supervisors
    assert started["guards"] == [], "one process beside QEMU: no guard, no keeper"


@pytest.mark.parametrize("suffix", ["", "-yama"])
def test_second_domain_and_hotplug_refused_naming_the_first(result: vm.Result, suffix: str) -> None:
    if suffix:
        assert result.passed("yama-1")["ptrace_scope"] == "1"
    refused = result.passed("refused-aa2" + suffix)["stderr"]
    assert "qemu-locked: " in refused and "guest 'aa1'" in refused, refused
    assert "qemu-locked: cannot write " in refused and ": in use (writing) by" in refused, refused
    hotplug = result.passed("refused-hotplug" + suffix)
    assert "Device or resource busy" in hotplug["stderr"], hotplug  # QEMU's open, refused
    assert "/ql-shared.img: in use (writing) by pid" in hotplug["log"], hotplug
    assert "guest 'aa1'" in hotplug["log"], hotplug  # our line, in the domain log


@pytest.mark.parametrize("who", ["views-root", "views-vm-user", "views-vm-user-yama"])
def test_status_check_doctor_as_root_and_as_the_vm_user(result: vm.Result, who: str) -> None:
    views = result.passed(who)
    disk = "/var/lib/libvirt/images/ql-shared.img"
    if who == "views-root":
        assert " aa1 " in views["status"] and disk in views["status"], views["status"]
        assert f"{disk}  write   in use (writing) by pid" in views["check"], views["check"]
        assert "guest 'aa1'" in views["check"]
    else:  # a confined QEMU's /proc entries are not the VM user's to read: AppArmor says so
        assert "writing  hidden" in views["status"] and disk in views["status"], views
        assert ("1 hidden: locked by a holder this process cannot identify: the host's security "
                "policy (AppArmor") in views["status"], views["status"]  # fmt: skip
        assert f"{disk}  write   in use (writing) by a holder" in views["check"], views["check"]
        assert "another host" not in views["check"], views["check"]
    assert not [ln for ln in views["doctor"].splitlines() if ln.startswith("FAIL")], views["doctor"]
    if who == "views-root":
        assert "WARN" not in views["doctor"], views["doctor"]


def test_the_lockspace_backend_too(result: vm.Result) -> None:
    lockspace = result.passed("lockspace-backend")
    line = next(ln for ln in lockspace["stderr"].splitlines() if "qemu-locked: " in ln)
    assert "guest 'aa1' on host 'aalab'" in line, line  # named from its lease record
    assert lockspace["leases"] >= 2, lockspace  # the domain's and the disk's
    assert lockspace["denied"] == [], "\n".join(lockspace["denied"])


def test_the_monitor_guard_where_the_supervisor_is_off(result: vm.Result) -> None:
    guard = result.passed("guard")
    assert guard["guards"] and all(v.startswith("libvirt-") for v in guard["guards"].values())
    assert "qemu-locked: " in guard["held"] and "guest 'aa1'" in guard["held"], guard["held"]
    assert guard["denied"] == [], "\n".join(guard["denied"])


def test_not_one_apparmor_denial_once_enabled(result: vm.Result) -> None:
    denied: list[str] = result.passed("denials")["denied"]
    assert denied == [], "apparmor DENIED lines:\n" + "\n".join(denied)


def test_without_the_ptrace_rules_the_refusal_says_the_policy_hides_the_holder(
    result: vm.Result,
) -> None:
    blind = result.passed("blind-vms")
    line = next(ln for ln in blind["stderr"].splitlines() if "qemu-locked: " in ln)
    assert "by a holder this process cannot identify: the host's security policy (" in line, line
    assert "denies it other processes' /proc entries" in line, line
    assert blind["denied"] and all('operation="ptrace"' in d for d in blind["denied"]), blind


def test_disable_all_and_purge_take_the_rules_out(result: vm.Result) -> None:
    result.passed("disable-purge")
    assert result.ok, result.explain()
