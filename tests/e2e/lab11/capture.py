"""Capture fixtures/domains/lv11_* from real libvirt 11.3 + QEMU 10.0 starts (the lab11 tree).

    .venv/bin/python tests/e2e/lab11/capture.py

Each variant is defined with qemu-locked as its emulator and started; the argv is read from
the running QEMU's /proc/PID/cmdline (what qemu-locked exec'd: libvirt's argv unchanged), the
live XML from ``virsh dumpxml``.  The plan is compared with the one written by hand below
(DESIGN.md section 4); on a difference the hand-written one is kept, so that
tests/test_fixtures_plan.py fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for e2e.lab11
from e2e.lab11.harness import REPO, Lab  # noqa: E402

FIXTURES = REPO / "fixtures" / "domains"
IMAGES = "/var/lib/libvirt/images/lab11fx"
LOCKCTL = str(Path(sys.executable).parent / "qemu-lockctl")


def disk(path: str, fmt: str, extra: str = "", dev: str = "vda") -> str:
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file='{path}'/><target dev='{dev}' bus='virtio'/>{extra}</disk>"
    )


# name -> (disks XML, features XML, {path: mode} written by hand)
VARIANTS = {
    "lv11_basic": ([disk(f"{IMAGES}/basic.qcow2", "qcow2")], "",
                   {f"{IMAGES}/basic.qcow2": "exclusive"}),
    "lv11_async_teardown": ([disk(f"{IMAGES}/async.qcow2", "qcow2")],
                            "<async-teardown enabled='yes'/>",
                            {f"{IMAGES}/async.qcow2": "exclusive"}),
    "lv11_backing": ([disk(f"{IMAGES}/top.qcow2", "qcow2")], "",
                     {f"{IMAGES}/top.qcow2": "exclusive", f"{IMAGES}/base.qcow2": "shared"}),
    "lv11_readonly": ([disk(f"{IMAGES}/ro.img", "raw", "<readonly/>")], "",
                      {f"{IMAGES}/ro.img": "shared"}),
    "lv11_shareable": ([disk(f"{IMAGES}/sh.img", "raw", "<shareable/>")], "",
                       {f"{IMAGES}/sh.img": "shared"}),
}  # fmt: skip


def domain_xml(name: str, disks: list[str], features: str) -> str:
    return (
        f"<domain type='qemu'><name>qlk-fx-{name}</name><memory unit='MiB'>64</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
        f"<features>{features}</features><devices><emulator>/usr/local/bin/qemu-locked"
        f"</emulator>{''.join(disks)}<serial type='pty'/><console type='pty'/></devices></domain>"
    )


def qemu_argv(name: str) -> list[str]:
    tag = f"guest=qlk-fx-{name},".encode()
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if (
            argv
            and argv[0].endswith(b"qemu-system-x86_64")
            and any(a.startswith(tag) for a in argv)
        ):
            return [a.decode() for a in argv[1:]]
    raise LookupError(name)


def normal(text: str) -> str:
    return re.sub(r"domain-\d+-", "domain-1-", text)


def main() -> None:
    with Lab() as lab:
        images = lab.path(IMAGES)
        images.mkdir(parents=True, exist_ok=True)
        for f in ("basic.qcow2", "async.qcow2", "base.qcow2"):
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(images / f), "16M"], check=True
            )
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", f"{IMAGES}/base.qcow2",
                        "-F", "qcow2", str(images / "top.qcow2"), "16M"], check=True)  # fmt: skip
        for f in ("ro.img", "sh.img"):
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "raw", str(images / f), "16M"], check=True
            )
        for name, (disks, features, want) in VARIANTS.items():
            xml = domain_xml(name, disks, features)
            src = lab.path("/root") / f"{name}.xml"
            src.write_text(xml)
            lab.virsh("define", str(src))
            lab.virsh("start", f"qlk-fx-{name}")
            argv = [normal(a) for a in qemu_argv(name)]
            live = normal(lab.virsh("dumpxml", f"qlk-fx-{name}").stdout)
            inactive = lab.virsh("dumpxml", "--inactive", f"qlk-fx-{name}").stdout
            lab.virsh("destroy", f"qlk-fx-{name}")
            lab.virsh("undefine", f"qlk-fx-{name}")
            p = subprocess.run([LOCKCTL, "plan", "--json", "--", *argv], capture_output=True,
                               text=True, check=True)  # fmt: skip
            plan = json.loads(p.stdout)
            got = {d["path"]: d["mode"] for d in plan["disks"]}
            if got != want:
                print(f"{name}: plan {got} differs from the hand-written {want}")
                for d in plan["disks"]:
                    d["mode"] = want.get(d["path"], d["mode"])
            (FIXTURES / f"{name}.xml").write_text(inactive)
            (FIXTURES / f"{name}.live.xml").write_text(live)
            (FIXTURES / f"{name}.argv.json").write_text(json.dumps(argv, indent=1) + "\n")
            (FIXTURES / f"{name}.plan.json").write_text(json.dumps(plan, indent=2) + "\n")
            print(f"{name}: {len(argv)} args, {got}")
        for f in images.iterdir():
            f.unlink()


if __name__ == "__main__":
    main()
