"""Control scenario of the AppArmor lab: confinement is real and the stock QEMU runs under it.

A Debian 12 host (its cloud kernel, AppArmor, libvirt 9.0, QEMU 7.2) boots under QEMU TCG
(tests/e2e/aalab); inside it libvirt starts a tiny TCG domain with the stock emulator.
Without this passing, a denial seen in another aalab scenario proves nothing about
qemu-locked.  Root only; under CI=true a reason to skip is a failure.
"""

from __future__ import annotations

import pytest

from e2e.aalab import image, vm

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]

RUN = r"""#!/usr/bin/python3
import re
from pathlib import Path
from guest import IMAGES, define, denials, label, qemu_pid, sh, step, tiny_domain, virsh

NAME = "aa-control"
DISK = str(IMAGES / "aa-control.img")

with step("lsm") as s:
    s.data["lsm"] = Path("/sys/kernel/security/lsm").read_text().strip()
    s.data["enabled"] = Path("/sys/module/apparmor/parameters/enabled").read_text().strip()
    s.check(s.data["enabled"] == "Y", "apparmor module not enabled")

with step("capabilities") as s:
    caps = virsh("capabilities", check=True).stdout
    s.data["models"] = re.findall(r"<model>([^<]*)</model>", caps)
    s.check("<model>apparmor</model>" in caps, "libvirt's security driver is not apparmor")

with step("define") as s:
    sh(["qemu-img", "create", "-q", "-f", "raw", DISK, "16M"], check=True)
    define(NAME, tiny_domain(NAME, DISK))
    s.data["uuid"] = virsh("domuuid", NAME, check=True).stdout.strip()

with step("start") as s:
    r = virsh("start", NAME)
    s.check(r.returncode == 0, r.stderr)
    s.data["pid"] = qemu_pid(NAME)

with step("confined") as s:
    uuid = virsh("domuuid", NAME, check=True).stdout.strip()
    s.data["label"] = label(qemu_pid(NAME))
    s.data["expected"] = f"libvirt-{uuid} (enforce)"

with step("destroy") as s:
    virsh("destroy", NAME, check=True)

with step("denials") as s:
    s.data["denied"] = denials()
"""


@pytest.fixture(scope="module")
def result(aalab_paths: image.Paths, tmp_path_factory: pytest.TempPathFactory) -> vm.Result:
    work = tmp_path_factory.mktemp("aalab-control")
    payload = vm.Payload(work / "payload")
    payload.set_run(RUN)
    return vm.boot(payload, timeout=600, workdir=work, paths=aalab_paths)


def test_guest_kernel_has_apparmor_and_yama(result: vm.Result) -> None:
    facts = result.passed("mounts")
    lsm = str(facts.get("lsm") or "").split(",")
    assert "apparmor" in lsm and "yama" in lsm, f"guest lsm list: {facts.get('lsm')}"
    assert facts.get("apparmor_enabled") == "Y", facts


def test_profiles_loaded_and_libvirtd_confined(result: vm.Result) -> None:
    loaded = result.passed("apparmor")
    assert "libvirtd" in loaded["profiles"], loaded
    daemons = result.passed("daemons")
    assert daemons["libvirtd_label"] == "libvirtd (enforce)", daemons


def test_libvirt_security_driver_is_apparmor(result: vm.Result) -> None:
    result.passed("lsm")
    caps = result.passed("capabilities")
    assert "apparmor" in caps["models"], caps


def test_stock_qemu_starts_confined_by_its_domain_profile(result: vm.Result) -> None:
    result.passed("define")
    result.passed("start")
    confined = result.passed("confined")
    assert confined["label"] == confined["expected"], confined
    result.passed("destroy")


def test_no_apparmor_denial_in_the_control(result: vm.Result) -> None:
    denied = result.passed("denials")["denied"]
    assert denied == [], "apparmor DENIED lines with the stock emulator:\n" + "\n".join(denied)


def test_guest_ran_to_the_end(result: vm.Result) -> None:
    result.passed("run")
    assert result.ok, result.explain()
    assert (result.out / "guest-logs" / "dmesg.txt").is_file(), result.explain()
