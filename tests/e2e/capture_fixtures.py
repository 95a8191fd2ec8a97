"""Regenerate fixtures/domains/ from real starts under a real libvirtd (root only).

For every variant below: define the domain with the stock emulator and keep its
``virsh dumpxml --inactive`` (NAME.xml); put it under qemu-locked with
``qemu-lockctl libvirt enable``, but with QEMU_LOCKED_EMULATOR pointing at the
harness's argv logger, which writes the argv it receives and execs the real
QEMU; start it, keep that argv (NAME.argv.json), destroy it.  Then
``qemu-lockctl plan --json -- ARGV`` is checked against the plan written here
by hand from DESIGN.md section 4 (``disks``/``skipped`` of each variant) and
kept as NAME.plan.json; a disagreement is reported and the hand-written modes
are what the fixture keeps (so tests/test_fixtures_plan.py fails on it).

Run: .venv/bin/python tests/e2e/capture_fixtures.py [NAME...]
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e import lab as L

OUT = L.REPO / "fixtures" / "domains"
LAB = "/var/lib/libvirt/images/lab"  # stands for the run's temporary images directory
LOOP = "/dev/loop0"  # stands for the loop device of the run
NBD_PORT = "10809"  # stands for the port qemu-nbd listened on
X, S = "exclusive", "shared"
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
LOCKCTL = str(Path(sys.executable).parent / "qemu-lockctl")


@dataclass
class Ctx:
    lab: L.Lab
    name: str
    subst: dict[str, str] = field(default_factory=dict)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def img(self, file: str, fmt: str | None = None, backing: str | None = None) -> str:
        fmt = fmt or ("qcow2" if file.endswith(".qcow2") else "raw")
        path = self.lab.images / self.name / file
        path.parent.mkdir(parents=True, exist_ok=True)
        for d in (path.parent, path.parent.parent):
            if d != self.lab.images:
                d.chmod(0o755)
        if not path.exists():
            self.lab.image(f"{self.name}/{file}", fmt=fmt, backing=backing)
        return str(path)

    def directory(self, sub: str) -> str:
        path = self.lab.images / self.name / sub
        path.mkdir(parents=True, exist_ok=True)
        (path / "README.TXT").write_text("a directory shown to the guest as a FAT floppy\n")
        for d in (path, path.parent):
            d.chmod(0o755)
        return str(path)

    def loop(self) -> str:
        dev = self.lab.loop_device()
        self.subst[dev] = LOOP
        return dev

    def dom(self, disks: list[str], **kw: object) -> str:
        return L.domain_xml(f"{L.PREFIX}fx-{self.name}", disks, **kw)  # type: ignore[arg-type]


@dataclass
class Variant:
    name: str
    build: Callable[[Ctx], str]
    disks: list[tuple[str, str]]  # the plan by hand: (path, mode), LAB/LOOP placeholders
    skipped: list[str] = field(default_factory=list)  # a word of each skip reason
    needs: tuple[str, ...] = ()


D = L.disk_xml


def _nbd(c: Ctx) -> str:
    img = c.img("exported.raw")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", port, "-x", "lab", "-e", "2", "-t", img],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    c.cleanups.append(lambda: (proc.terminate(), proc.wait(10)))  # type: ignore[func-returns-value]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", int(port))) == 0:
                break
        time.sleep(0.05)
    c.subst[f"'{port}'"] = f"'{NBD_PORT}'"
    c.subst[f'"{port}"'] = f'"{NBD_PORT}"'
    source = f"<source protocol='nbd' name='lab'><host name='127.0.0.1' port='{port}'/></source>"
    return c.dom(
        [
            D(c.img("local.qcow2")),
            D(None, "vdb", kind="network", fmt="raw", source_xml=source),
        ]
    )


def _nvram(c: Ctx) -> str:
    vars_path = str(c.lab.images / c.name / "VARS.fd")
    (c.lab.images / c.name).mkdir(exist_ok=True)
    (c.lab.images / c.name).chmod(0o755)
    loader = (
        f"\n    <loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>"
        f"\n    <nvram template='{OVMF_VARS}'>{vars_path}</nvram>"
    )
    return c.dom(
        [D(c.img("d1.qcow2"))],
        os_extra=loader,
        memory_mib=128,
        features="\n  <features><acpi/></features>",
    )


VIRTIO_SCSI = "<controller type='scsi' index='0' model='virtio-scsi'/>"

VARIANTS: list[Variant] = [
    Variant("qcow2", lambda c: c.dom([D(c.img("d1.qcow2"))]), [(f"{LAB}/qcow2/d1.qcow2", X)]),
    Variant("raw", lambda c: c.dom([D(c.img("d1.raw"), fmt="raw")]), [(f"{LAB}/raw/d1.raw", X)]),
    Variant(
        "two_disks",
        lambda c: c.dom([D(c.img("d1.qcow2")), D(c.img("d2.raw"), "vdb", fmt="raw")]),
        [(f"{LAB}/two_disks/d1.qcow2", X), (f"{LAB}/two_disks/d2.raw", X)],
    ),
    Variant(
        "readonly",
        lambda c: c.dom([D(c.img("ro.raw"), fmt="raw", readonly=True)]),
        [(f"{LAB}/readonly/ro.raw", S)],
    ),
    Variant(
        "shareable",
        lambda c: c.dom([D(c.img("shared.raw"), fmt="raw", shareable=True, cache="none")]),
        [(f"{LAB}/shareable/shared.raw", S)],
    ),
    Variant(
        "cdrom_media",
        lambda c: c.dom(
            [
                D(c.img("d1.qcow2")),
                D(c.img("media.iso"), "hdc", bus="ide", fmt="raw", device="cdrom", readonly=True),
            ]  # fmt: skip
        ),
        [(f"{LAB}/cdrom_media/d1.qcow2", X), (f"{LAB}/cdrom_media/media.iso", S)],
    ),
    Variant(
        "cdrom_empty",
        lambda c: c.dom(
            [
                D(c.img("d1.qcow2")),
                D(None, "hdc", bus="ide", fmt="raw", device="cdrom", readonly=True),
            ]  # fmt: skip
        ),
        [(f"{LAB}/cdrom_empty/d1.qcow2", X)],
    ),
    Variant(
        "weird_path",
        lambda c: c.dom([D(c.img("we,ird name.qcow2"))]),
        [(f"{LAB}/weird_path/we,ird name.qcow2", X)],
    ),
    Variant(
        "backing2",
        lambda c: c.dom([D(c.img("top.qcow2", backing=c.img("base.qcow2")))]),
        [(f"{LAB}/backing2/top.qcow2", X), (f"{LAB}/backing2/base.qcow2", S)],
    ),
    Variant(
        "backing3",
        lambda c: c.dom(
            [D(c.img("top.qcow2", backing=c.img("mid.qcow2", backing=c.img("base.qcow2"))))]
        ),
        [
            (f"{LAB}/backing3/top.qcow2", X),
            (f"{LAB}/backing3/mid.qcow2", S),
            (f"{LAB}/backing3/base.qcow2", S),
        ],
    ),
    Variant(
        "backing_raw_base",
        lambda c: c.dom([D(c.img("top.qcow2", backing=c.img("base.raw")))]),
        [(f"{LAB}/backing_raw_base/top.qcow2", X), (f"{LAB}/backing_raw_base/base.raw", S)],
    ),
    Variant(
        "readonly_chain",
        lambda c: c.dom([D(c.img("top.qcow2", backing=c.img("base.qcow2")), readonly=True)]),
        [(f"{LAB}/readonly_chain/top.qcow2", S), (f"{LAB}/readonly_chain/base.qcow2", S)],
    ),
    Variant(
        "block_loop",
        lambda c: c.dom([D(c.loop(), kind="block", fmt="raw")]),
        [(LOOP, X)],
    ),
    Variant(
        "transient",
        lambda c: c.dom([D(c.img("transient.qcow2"), transient=True)]),
        [(f"{LAB}/transient/transient.qcow2", X)],
    ),
    Variant(
        "sata_q35",
        lambda c: c.dom(
            [
                D(c.img("d1.qcow2"), "sda", bus="sata"),
                D(c.img("media.iso"), "sdb", bus="sata", fmt="raw", device="cdrom", readonly=True),
                D(None, "sdc", bus="sata", fmt="raw", device="cdrom", readonly=True),
            ],
            machine="q35",
        ),  # fmt: skip
        [(f"{LAB}/sata_q35/d1.qcow2", X), (f"{LAB}/sata_q35/media.iso", S)],
    ),
    Variant(
        "scsi",
        lambda c: c.dom(
            [
                D(c.img("d1.qcow2"), "sda", bus="scsi"),
                D(c.img("media.iso"), "sdb", bus="scsi", fmt="raw", device="cdrom", readonly=True),
            ],
            devices_extra=VIRTIO_SCSI,
        ),  # fmt: skip
        [(f"{LAB}/scsi/d1.qcow2", X), (f"{LAB}/scsi/media.iso", S)],
    ),
    Variant(
        "ide",
        lambda c: c.dom(
            [
                D(c.img("d1.qcow2"), "hda", bus="ide"),
                D(c.img("d2.raw"), "hdb", bus="ide", fmt="raw"),
            ]  # fmt: skip
        ),
        [(f"{LAB}/ide/d1.qcow2", X), (f"{LAB}/ide/d2.raw", X)],
    ),
    Variant(
        "usb",
        lambda c: c.dom([D(c.img("stick.raw"), "sda", bus="usb", fmt="raw")]),
        [(f"{LAB}/usb/stick.raw", X)],
    ),
    Variant(
        "several",
        lambda c: c.dom(
            [
                D(c.img("d1.qcow2")),
                D(c.img("d2.raw"), "vdb", fmt="raw", readonly=True),
                D(c.img("d3.raw"), "hda", bus="ide", fmt="raw"),
                D(c.img("d4.qcow2"), "sda", bus="scsi"),
                D(c.img("d5.raw"), "vdc", fmt="raw", shareable=True, cache="none"),
            ],
            devices_extra=VIRTIO_SCSI,
        ),  # fmt: skip
        [
            (f"{LAB}/several/d1.qcow2", X),
            (f"{LAB}/several/d2.raw", S),
            (f"{LAB}/several/d3.raw", X),
            (f"{LAB}/several/d4.qcow2", X),
            (f"{LAB}/several/d5.raw", S),
        ],
    ),
    Variant(
        "floppy",
        lambda c: c.dom(
            [
                D(c.img("d1.qcow2")),
                D(c.img("floppy.img"), "fda", bus="fdc", fmt="raw", device="floppy"),
            ]
        ),
        [(f"{LAB}/floppy/d1.qcow2", X), (f"{LAB}/floppy/floppy.img", X)],
    ),  # fmt: skip
    Variant(
        "vvfat_dir",
        lambda c: c.dom(
            [
                D(c.img("d1.qcow2")),
                D(
                    c.directory("dir"),
                    "fda",
                    kind="dir",
                    bus="fdc",
                    fmt="fat",
                    device="floppy",
                    readonly=True,
                ),
            ]
        ),  # fmt: skip
        [(f"{LAB}/vvfat_dir/d1.qcow2", X)],
        skipped=["vvfat"],
    ),
    Variant(
        "nvram_ovmf",
        _nvram,
        [(OVMF_CODE, S), (f"{LAB}/nvram_ovmf/VARS.fd", X), (f"{LAB}/nvram_ovmf/d1.qcow2", X)],
        needs=(OVMF_CODE, OVMF_VARS),
    ),
    Variant(
        "nbd",
        _nbd,
        [(f"{LAB}/nbd/local.qcow2", X)],
        skipped=["nbd"],
    ),
    Variant(
        "cache_none_native",
        lambda c: c.dom(
            [D(c.img("d1.qcow2"), cache="none", driver_extra=" io='native' discard='unmap'")]
        ),
        [(f"{LAB}/cache_none_native/d1.qcow2", X)],
    ),
]


def placeholder(text: str, c: Ctx) -> str:
    text = text.replace(str(c.lab.images), LAB)
    for real, fake in c.subst.items():
        text = text.replace(real, fake)
    return re.sub(r"/var/lib/libvirt/qemu/domain-\d+-", "/var/lib/libvirt/qemu/domain-1-", text)


def plan_of(argv: list[str]) -> dict[str, object]:
    proc = subprocess.run(
        [LOCKCTL, "plan", "--json", "--", *argv], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"qemu-lockctl plan failed: {proc.stderr.strip()}")
    plan: dict[str, object] = json.loads(proc.stdout)
    return plan


def checked_plan(v: Variant, actual: dict[str, object]) -> tuple[dict[str, object], list[str]]:
    """The plan to keep, and what disagrees with the hand-written expectation."""
    disks: list[dict[str, str]] = actual["disks"]  # type: ignore[assignment]
    skipped: list[dict[str, str]] = actual["skipped"]  # type: ignore[assignment]
    problems = []
    got = sorted((d["path"], d["mode"]) for d in disks)
    if got != sorted(v.disks):
        problems.append(f"disks: expected {sorted(v.disks)}, qemu-lockctl says {got}")
    reasons = [s["reason"] for s in skipped]
    if len(reasons) != len(v.skipped) or not all(
        any(word in r for r in reasons) for word in v.skipped
    ):
        problems.append(f"skipped: expected {v.skipped}, qemu-lockctl says {reasons}")
    if not problems:
        return actual, []
    origins = {d["path"]: d["origin"] for d in disks}
    kept = {
        "disks": [{"path": p, "mode": m, "origin": origins.get(p, "?")} for p, m in v.disks],
        "skipped": skipped,
    }
    return kept, problems


def capture(lab: L.Lab, v: Variant) -> list[str]:
    c = Ctx(lab, v.name)
    name = f"{L.PREFIX}fx-{v.name}"
    record = L.ARGV_DIR / f"{name}.json"
    record.unlink(missing_ok=True)
    try:
        lab.define(v.build(c), locked=False)
        xml = lab.dumpxml(name)
        lab.lockctl("libvirt", "enable", name)
        captured = lab.dumpxml(name).replace(
            f"name='QEMU_LOCKED_EMULATOR' value='{L.REAL_QEMU}'",
            f"name='QEMU_LOCKED_EMULATOR' value='{L.ARGV_LOGGER}'",
        )
        lab.virsh("undefine", "--keep-nvram", name)
        lab.define(captured, locked=False)
        start = lab.start(name, check=False)
        if start.returncode != 0:
            return [f"virsh start failed: {start.stderr.strip()}"]
        L.wait_for(record.exists, 10, f"{record}")
        argv: list[str] = json.loads(record.read_text())["argv"]
        live = lab.dumpxml(name, inactive=False).replace(str(L.ARGV_LOGGER), L.REAL_QEMU)
    finally:
        lab.cleanup()
        for fn in c.cleanups:
            fn()
    argv = json.loads(placeholder(json.dumps(argv), c))
    (OUT / f"{v.name}.xml").write_text(placeholder(xml, c))
    (OUT / f"{v.name}.live.xml").write_text(placeholder(live, c))
    (OUT / f"{v.name}.argv.json").write_text(json.dumps(argv, indent=1, ensure_ascii=False) + "\n")
    plan, problems = checked_plan(v, plan_of(argv))
    (OUT / f"{v.name}.plan.json").write_text(json.dumps(plan, indent=2, ensure_ascii=False) + "\n")
    return problems


def main(names: list[str]) -> int:
    daemons, images = L.setup()
    try:
        L.apt_install(("ovmf",))  # for nvram_ovmf; skipped below if it does not install
    except (RuntimeError, L.LabUnavailable) as exc:
        L.log(f"ovmf not installed: {exc}")
    lab = L.Lab(daemons, images)
    OUT.mkdir(parents=True, exist_ok=True)
    failed = 0
    try:
        for v in VARIANTS:
            if names and v.name not in names:
                continue
            missing = [p for p in v.needs if not os.path.exists(p)]
            if missing:
                L.log(f"{v.name}: skipped, missing {' '.join(missing)} (apt-get install ovmf)")
                continue
            problems = capture(lab, v)
            for p in problems:
                L.log(f"{v.name}: {p}")
            failed += bool(problems)
            L.log(f"{v.name}: {'MISMATCH' if problems else 'ok'}")
    finally:
        L.remove_leftover_domains()
        daemons.stop_all()
        import shutil

        shutil.rmtree(images, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
