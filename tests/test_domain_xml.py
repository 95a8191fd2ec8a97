"""libvirt domain XML -> Plan: each element, the hardened parser, and
agreement with the plan of the QEMU argv libvirt really builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qemu_locked.model.errors import UsageError
from qemu_locked.model.plan import Plan
from qemu_locked.parse import domain_xml
from qemu_locked.parse.argv import parse_argv

DATA = Path(__file__).parent / "data"
FIXTURES = Path(__file__).parent.parent / "fixtures" / "domains"
X, S = "exclusive", "shared"


def dom(devices: str = "", os_: str = "", name: str = "t") -> str:
    return (
        f"<domain type='qemu'><name>{name}</name>"
        f"<os><type arch='x86_64'>hvm</type>{os_}</os>"
        f"<devices>{devices}</devices></domain>"
    )


def plan_of(xml: str) -> Plan:
    return domain_xml.plan_from_string(xml, "test.xml")


def locks(xml: str) -> list[tuple[str, str, str]]:
    return [(d.path, d.mode, d.role) for d in plan_of(xml).disks]


def reasons(xml: str) -> list[str]:
    return [s.reason for s in plan_of(xml).skipped]


# -- disks -------------------------------------------------------------------------

DISK_CASES = {
    "file": ("<disk type='file' device='disk'><source file='/i/a.raw'/><target dev='vda'/></disk>",
             [("/i/a.raw", X, "writable")]),
    "no type attribute is file": ("<disk device='disk'><source file='/i/a.raw'/></disk>",
                                  [("/i/a.raw", X, "writable")]),
    "block": ("<disk type='block' device='disk'><source dev='/dev/vg/lv'/><target dev='vda'/></disk>",
              [("/dev/vg/lv", X, "writable")]),
    "lun": ("<disk type='block' device='lun'><source dev='/dev/sdb'/><target dev='sda'/></disk>",
            [("/dev/sdb", X, "writable")]),
    "readonly": ("<disk type='file'><source file='/i/a.raw'/><readonly/></disk>",
                 [("/i/a.raw", S, "readonly")]),
    "shareable": ("<disk type='file'><source file='/i/a.raw'/><shareable/></disk>",
                  [("/i/a.raw", S, "shareable")]),
    "readonly beats shareable": (
        "<disk type='file'><source file='/i/a.raw'/><shareable/><readonly/></disk>",
        [("/i/a.raw", S, "readonly")]),
    "cdrom with media": ("<disk type='file' device='cdrom'><source file='/i/a.iso'/></disk>",
                         [("/i/a.iso", S, "readonly")]),
    "floppy writable": ("<disk type='file' device='floppy'><source file='/i/f.img'/></disk>",
                        [("/i/f.img", X, "writable")]),
    "transient: base opened writable at start": (
        "<disk type='file'><driver type='qcow2'/><source file='/i/t.qcow2'/><transient/></disk>",
        [("/i/t.qcow2", X, "writable")]),
    "transient shareBacking: read-only base": (
        "<disk type='file'><source file='/i/t.raw'/><transient shareBacking='yes'/></disk>",
        [("/i/t.raw", S, "backing")]),
    "backingStore chain": (
        "<disk type='file'><driver type='qcow2'/><source file='/i/top.qcow2'/>"
        "<backingStore type='file'><format type='qcow2'/><source file='/i/mid.qcow2'/>"
        "<backingStore type='block'><format type='raw'/><source dev='/dev/vg/base'/>"
        "<backingStore/></backingStore></backingStore></disk>",
        [("/i/top.qcow2", X, "writable"), ("/i/mid.qcow2", S, "backing"),
         ("/dev/vg/base", S, "backing")]),
    "readonly disk keeps its chain shared": (
        "<disk type='file'><driver type='qcow2'/><source file='/i/top.qcow2'/><readonly/>"
        "<backingStore type='file'><format type='raw'/><source file='/i/base.raw'/></backingStore>"
        "</disk>",
        [("/i/top.qcow2", S, "readonly"), ("/i/base.raw", S, "backing")]),
    "dataStore follows the disk's mode": (
        "<disk type='file'><driver type='qcow2'/><source file='/i/meta.qcow2'>"
        "<dataStore type='file'><format type='raw'/><source file='/i/data.raw'/></dataStore>"
        "</source><backingStore/></disk>",
        [("/i/meta.qcow2", X, "writable"), ("/i/data.raw", X, "writable")]),
    "same path twice: strongest wins": (
        "<disk type='file'><source file='/i/a.raw'/><readonly/></disk>"
        "<disk type='file'><source file='/i/a.raw'/></disk>",
        [("/i/a.raw", X, "writable")]),
    "path with comma and space": ("<disk type='file'><source file='/i/we,ird name.qcow2'/></disk>",
                                  [("/i/we,ird name.qcow2", X, "writable")]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(DISK_CASES))
def test_disk(name: str) -> None:
    xml, expected = DISK_CASES[name]
    assert locks(dom(xml)) == expected


SKIP_CASES = {
    "cdrom without media": ("<disk type='file' device='cdrom'><target dev='hdc'/></disk>",
                            "cdrom: no medium"),
    "floppy without media": ("<disk type='file' device='floppy'/>", "floppy: no medium"),
    "network": ("<disk type='network'><source protocol='nbd' name='exp'/></disk>",
                "network disk (nbd exp): not a local file"),
    "volume": ("<disk type='volume'><source pool='default' volume='v.img'/></disk>",
               "storage pool volume default/v.img: its path is known to libvirt only"),
    "dir": ("<disk type='dir'><source dir='/srv'/></disk>", "directory disk (vvfat): not an image file"),
    "nvme": ("<disk type='nvme'><source type='pci'/></disk>", "NVMe passthrough: no image file"),
    "vhostuser": ("<disk type='vhostuser'><source type='unix' path='/s'/></disk>",
                  "vhost-user disk: no image file"),
    "network backing": (
        "<disk type='file'><driver type='qcow2'/><source file='/i/top.qcow2'/>"
        "<backingStore type='network'><source protocol='rbd' name='p/base'/></backingStore></disk>",
        "network disk (rbd p/base): not a local file"),
    "lease": ("<lease><lockspace>area</lockspace><key>k</key><target path='/l'/></lease>",
              "libvirt <lease>: not used by qemu-locked"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SKIP_CASES))
def test_skipped_with_reason(name: str) -> None:
    xml, reason = SKIP_CASES[name]
    assert reason in reasons(dom(xml))


def test_header_backing_is_probed_only_without_backing_store() -> None:
    """No <backingStore>: libvirt reads the qcow2 header at start, so do we.
    <backingStore/> says the chain is complete; raw has no header chain."""
    probe = {d.path: d.probe_backing for d in plan_of(dom(
        "<disk type='file'><driver type='qcow2'/><source file='/i/p.qcow2'/></disk>"
        "<disk type='file'><driver type='qcow2'/><source file='/i/n.qcow2'/><backingStore/></disk>"
        "<disk type='file'><driver type='raw'/><source file='/i/r.raw'/></disk>"
        "<disk type='file'><source file='/i/default-raw.img'/></disk>"
    )).disks}  # fmt: skip
    assert probe == {"/i/p.qcow2": True, "/i/n.qcow2": False, "/i/r.raw": False,
                     "/i/default-raw.img": False}  # fmt: skip


# -- firmware, name, uuid ---------------------------------------------------------------

FIRMWARE_CASES = {
    "pflash code read-only, vars writable": (
        "<loader readonly='yes' type='pflash'>/fw/CODE.fd</loader><nvram>/nv/vm_VARS.fd</nvram>",
        [("/fw/CODE.fd", S, "readonly"), ("/nv/vm_VARS.fd", X, "writable")]),
    "loader readonly without type": ("<loader readonly='yes'>/fw/CODE.fd</loader>",
                                     [("/fw/CODE.fd", S, "readonly")]),
    "writable pflash code": ("<loader readonly='no' type='pflash'>/fw/ALL.fd</loader>",
                             [("/fw/ALL.fd", X, "writable")]),
    "nvram with a source (libvirt >= 8.5)": (
        "<nvram type='file'><source file='/nv/new_VARS.fd'/></nvram>",
        [("/nv/new_VARS.fd", X, "writable")]),
    "rom loader is not locked": ("<loader type='rom'>/fw/bios.bin</loader>", []),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FIRMWARE_CASES))
def test_firmware(name: str) -> None:
    os_, expected = FIRMWARE_CASES[name]
    assert locks(dom(os_=os_)) == expected


def test_network_nvram_and_autoselected_firmware_are_noted() -> None:
    skipped = reasons(dom(os_="<nvram type='network'><source protocol='iscsi'/></nvram>"))
    assert skipped == ["network NVRAM: not a local file"]
    xml = "<domain><name>t</name><os firmware='efi'><type>hvm</type></os></domain>"
    assert reasons(xml) == ["firmware files are chosen by libvirt at start"]


def test_guest_and_uuid() -> None:
    xml = "<domain><name>web</name><uuid>d676c928-04bf-457e-9df6-ef0e7d76dd83</uuid></domain>"
    p = plan_of(xml)
    assert (p.guest, p.uuid) == ("web", "d676c928-04bf-457e-9df6-ef0e7d76dd83")
    assert plan_of("<domain/>").guest is None


def test_lab1_fixture() -> None:
    p = domain_xml.plan_from_file(DATA / "lab1.xml")
    assert p.guest == "lab1"
    assert [(d.path.rsplit("/", 1)[-1], d.mode) for d in p.disks] == [
        ("OVMF_CODE.fd", S), ("lab1_VARS.fd", X), ("overlay.qcow2", X), ("base.qcow2", S),
        ("d1.raw", X), ("shared.raw", S), ("loop0", X), ("media.iso", S), ("transient.qcow2", X),
    ]  # fmt: skip
    assert len(p.skipped) == 7


def test_string_and_file_agree(tmp_path: Path) -> None:
    text = (DATA / "lab1.xml").read_text()
    with_decl = "<?xml version='1.0' encoding='UTF-8'?>\n" + text
    assert domain_xml.plan_from_string(with_decl, "x") == domain_xml.plan_from_file(
        DATA / "lab1.xml"
    )
    latin = tmp_path / "latin1.xml"
    latin.write_bytes(
        b"<?xml version='1.0' encoding='ISO-8859-1'?><domain><name>caf\xe9</name>"
        b"<devices><disk type='file'><source file='/i/\xe9.img'/></disk></devices></domain>"
    )
    p = domain_xml.plan_from_file(latin)
    assert (p.guest, p.disks[0].path) == ("café", "/i/é.img")


# -- the hardened parser ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["bomb.xml", "xxe.xml", "xxe-parameter.xml"])
def test_entities_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match="DOCTYPE declares entities; refused"):
        domain_xml.plan_from_file(DATA / name)


def test_entities_in_utf16_are_refused_after_parsing() -> None:
    """The byte scan cannot see UTF-16; the parsed DOCTYPE is checked too,
    and nothing was expanded."""
    data = '<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/passwd">]><domain><name>&x;</name></domain>'
    assert b"<!ENTITY" not in data.encode("utf-16")
    with pytest.raises(UsageError, match="DOCTYPE declares entities"):
        domain_xml.plan_from_bytes(data.encode("utf-16"), "utf16.xml")


def test_external_dtd_is_refused_and_plain_doctype_allowed() -> None:
    ext = b'<!DOCTYPE domain SYSTEM "http://127.0.0.1:9/x.dtd"><domain><name>a</name></domain>'
    with pytest.raises(UsageError, match="external DTD"):
        domain_xml.plan_from_bytes(ext, "ext.xml")
    assert (
        domain_xml.plan_from_bytes(b"<!DOCTYPE domain><domain><name>a</name></domain>", "p").guest
        == "a"
    )


def test_size_limit_is_checked_before_parsing(tmp_path: Path) -> None:
    huge = tmp_path / "huge.xml"
    with open(huge, "wb") as f:
        f.write(b"<domain><name>x</name><description>")
        f.truncate(domain_xml.MAX_XML + 10)  # a sparse file: its size alone is refused
    with pytest.raises(UsageError, match="larger than 10 MiB"):
        domain_xml.plan_from_file(huge)
    with pytest.raises(UsageError, match="larger than 10 MiB"):
        domain_xml.plan_from_bytes(b" " * (domain_xml.MAX_XML + 1), "stdin")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"<domain><name>a</name>", "not valid XML"),
        (b"", "not valid XML"),
        (
            b"<network><name>default</name></network>",
            "not a libvirt domain XML (root element <network>)",
        ),
        (b"<domain><name>&undefined;</name></domain>", "not valid XML"),
    ],
)
def test_bad_xml_is_one_line(data: bytes, message: str) -> None:
    with pytest.raises(UsageError, match=r"^bad\.xml: ") as err:
        domain_xml.plan_from_bytes(data, "bad.xml")
    assert message in err.value.message
    assert "\n" not in err.value.message


def test_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read: No such file"):
        domain_xml.plan_from_file(tmp_path / "missing.xml")
    with pytest.raises(UsageError, match="not a regular file"):
        domain_xml.plan_from_file(tmp_path)
    fifo = tmp_path / "fifo"
    import os

    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        domain_xml.plan_from_file(fifo)  # opened O_NONBLOCK: no hang


# -- agreement with libvirt's real argv --------------------------------------------------
#
# Disk XML and the -blockdev/-device lines libvirt 9.0 built for it, as captured from real
# starts (../shared/reference/libvirt-argv-samples.txt).  The XML plan and the argv plan must
# lock the same paths in the same modes and roles.

SB = '{"driver":"%s","filename":"%s","node-name":"libvirt-%d-storage","auto-read-only":true,"discard":"unmap"}'
FMT = '{"node-name":"libvirt-%d-format","read-only":%s,"driver":"%s","file":"libvirt-%d-storage"%s}'
DEV = '{"driver":"%s","bus":"pci.0","addr":"0x2","drive":"libvirt-%d-format","id":"d0"%s}'
LAB = "/var/lib/libvirt/images/lab"


def blockdev(
    n: int, path: str, ro: bool, fmt: str, backing: str = "", driver: str = "file"
) -> list[str]:
    tail = ',"backing":%s' % (backing or "null") if fmt == "qcow2" else ""
    return [
        "-blockdev",
        SB % (driver, path, n),
        "-blockdev",
        FMT % (n, str(ro).lower(), fmt, n, tail),
    ]


def device(n: int, driver: str = "virtio-blk-pci", extra: str = "") -> list[str]:
    return ["-device", DEV % (driver, n, extra)]


LIBVIRT_SAMPLES = {
    "qcow2": (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{LAB}/d1.qcow2'/><target dev='vda' bus='virtio'/></disk>",
        blockdev(1, f"{LAB}/d1.qcow2", False, "qcow2") + device(1)),
    "raw": (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{LAB}/d1.raw'/><target dev='vda' bus='virtio'/></disk>",
        blockdev(1, f"{LAB}/d1.raw", False, "raw") + device(1)),
    "readonly": (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{LAB}/ro.raw'/><target dev='vda' bus='virtio'/><readonly/></disk>",
        blockdev(1, f"{LAB}/ro.raw", True, "raw") + device(1)),
    "shareable": (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/><source file='{LAB}/shared.raw'/><target dev='vda' bus='virtio'/><shareable/></disk>",
        blockdev(1, f"{LAB}/shared.raw", False, "raw") + device(1, extra=',"share-rw":true')),
    "cdrom_media": (
        f"<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{LAB}/media.iso'/><target dev='hdc' bus='ide'/><readonly/></disk>",
        blockdev(1, f"{LAB}/media.iso", True, "raw") + device(1, "ide-cd")),
    "cdrom_empty": (
        "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='hdc' bus='ide'/><readonly/></disk>",
        ["-device", '{"driver":"ide-cd","bus":"ide.1","unit":0,"id":"ide0-1-0"}']),
    "weird_path": (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{LAB}/we,ird name.qcow2'/><target dev='vda' bus='virtio'/></disk>",
        blockdev(1, f"{LAB}/we,ird name.qcow2", False, "qcow2") + device(1)),
    "backing": (
        # The live XML of that start: libvirt probed the chain and wrote it out.
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{LAB}/overlay.qcow2'/>"
        f"<backingStore type='file'><format type='qcow2'/><source file='{LAB}/base.qcow2'/><backingStore/></backingStore>"
        "<target dev='vda' bus='virtio'/></disk>",
        blockdev(2, f"{LAB}/base.qcow2", True, "qcow2")
        + blockdev(1, f"{LAB}/overlay.qcow2", False, "qcow2", '"libvirt-2-format"') + device(1)),
    "block": (
        "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/loop0'/><target dev='vda' bus='virtio'/></disk>",
        blockdev(1, "/dev/loop0", False, "raw", driver="host_device") + device(1)),
    "transient": (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{LAB}/transient.qcow2'/><target dev='vda' bus='virtio'/><transient/></disk>",
        blockdev(1, f"{LAB}/transient.qcow2", False, "qcow2") + device(1)),
}  # fmt: skip


def comparable(p: Plan) -> list[tuple[str, str, str]]:
    """What must agree.  Allowed differences: ``origin`` (an XML element vs a -blockdev
    node name) and the order (the argv lists backing nodes first; locks are taken in
    inode order anyway)."""
    return sorted((d.path, d.mode, d.role) for d in p.disks)


@pytest.mark.parametrize("name", list(LIBVIRT_SAMPLES))
def test_xml_plan_matches_libvirt_argv_sample(name: str) -> None:
    xml, argv = LIBVIRT_SAMPLES[name]
    from_xml = plan_of(dom(xml, name="lab"))
    from_argv = parse_argv(["-name", "guest=lab,debug-threads=on", *argv])
    assert comparable(from_xml) == comparable(from_argv)
    assert from_xml.guest == from_argv.guest == "lab"
    # probe_backing may differ: the XML of an unprobed qcow2 (no <backingStore>) leaves the
    # header to lock time, while libvirt's argv always says "backing" (null or a node)
    # because libvirt read the header itself before starting QEMU.
    if name == "cdrom_empty":
        # argv: a -device with no drive, nothing to note; XML: the empty tray is noted.
        assert not from_argv.skipped and [s.reason for s in from_xml.skipped] == [
            "cdrom: no medium"
        ]


def _argv_json(xml_path: Path) -> Path:
    """NAME.xml and NAME.live.xml (dumpxml while running) -> NAME.argv.json."""
    return xml_path.with_name(xml_path.name.split(".", 1)[0] + ".argv.json")


def _fixture_pairs() -> list[Path]:
    return sorted(p for p in FIXTURES.glob("*.xml") if _argv_json(p).exists())


def _argv_of(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    argv = data["argv"] if isinstance(data, dict) else data
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    if argv and not argv[0].startswith("-"):
        argv = argv[1:]  # the program name
    return argv


@pytest.mark.skipif(not _fixture_pairs(), reason="no fixtures/domains/*.xml with *.argv.json yet")
@pytest.mark.parametrize("xml_path", _fixture_pairs(), ids=lambda p: p.name)
def test_xml_plan_matches_real_libvirt_start(xml_path: Path) -> None:
    """For every domain captured from a real libvirt start, the plan of its XML and the plan
    of the argv libvirt gave QEMU lock the same files in the same modes.  Allowed
    differences, and why:

    * origin strings and order (see ``comparable``);
    * ``skipped`` entries: the XML notes what libvirt never puts on the command line
      (an empty cdrom tray, <lease> elements, a firmware ROM);
    * backing files: an inactive XML (NAME.xml) without <backingStore> has its qcow2 chain
      read from the image header at lock time (probe_backing), where the argv names it;
      those disks are compared without their chain.  The live XML (NAME.live.xml) carries
      the chain libvirt probed, and must agree in full;
    * a <transient/> disk's live XML shows the overlay libvirt added after start (below).
    """
    from_xml = domain_xml.plan_from_file(xml_path)
    from_argv = parse_argv(_argv_of(_argv_json(xml_path)))
    assert (from_xml.guest, from_xml.uuid) == (from_argv.guest, from_argv.uuid)
    if any(d.probe_backing for d in from_xml.disks):
        backing_only = {d.path for d in from_argv.disks if d.role == "backing"} - {
            d.path for d in from_xml.disks
        }
        argv_view = [t for t in comparable(from_argv) if t[0] not in backing_only]
    else:
        argv_view = comparable(from_argv)
    xml_view = comparable(from_xml)
    overlays = {d.path for d in from_xml.disks if ".TRANSIENT-" in d.path}
    if overlays:
        # <transient/> in the live XML: libvirt created IMAGE.TRANSIENT-DOMAIN over QMP after
        # QEMU started and moved the disk onto it; the argv shows the base as it was opened at
        # start (writable), which is what the wrapper locked.  Both views name the base.
        bases = {p.split(".TRANSIENT-")[0] for p in overlays}
        assert bases <= {d.path for d in from_argv.disks}
        xml_view = [t for t in xml_view if t[0] not in overlays | bases]
        argv_view = [t for t in argv_view if t[0] not in bases]
    assert xml_view == argv_view
