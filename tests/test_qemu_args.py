"""The argv parser: every form in DESIGN.md section 4, as tables."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qemu_locked.model.errors import ArgumentError, QemuLockedError
from qemu_locked.parse.argv import parse_argv
from qemu_locked.parse.keyval import split_opts

X, S = "exclusive", "shared"


def disks(*args: str, read_config=None) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return [(d.path, d.mode) for d in parse_argv(list(args), read_config).disks]


def skipped(*args: str) -> list[str]:
    return [s.reason for s in parse_argv(list(args)).skipped]


def bd(**kw: object) -> str:
    return json.dumps(kw)


# -- libvirt 9 captures (../shared/reference/libvirt-argv-samples.txt) -----------

LAB = "/var/lib/libvirt/images/lab"


def storage(name: str, path: str, driver: str = "file", **extra: object) -> list[str]:
    node = {"driver": driver, "filename": path, "node-name": name, "auto-read-only": True,
            "discard": "unmap", **extra}  # fmt: skip
    return ["-blockdev", json.dumps(node)]


def fmt(name: str, file: str, ro: bool, driver: str = "qcow2", backing: object = None,
        with_backing: bool = True) -> list[str]:  # fmt: skip
    node: dict[str, object] = {"node-name": name, "read-only": ro, "driver": driver, "file": file}
    if with_backing:
        node["backing"] = backing
    return ["-blockdev", json.dumps(node)]


def device(drive: str, driver: str = "virtio-blk-pci", **extra: object) -> list[str]:
    return [
        "-device",
        json.dumps({"driver": driver, "bus": "pci.0", "drive": drive, "id": "d", **extra}),
    ]


LIBVIRT_CASES = {
    "qcow2": (
        storage("libvirt-1-storage", f"{LAB}/d1.qcow2")
        + fmt("libvirt-1-format", "libvirt-1-storage", False)
        + device("libvirt-1-format"),
        [(f"{LAB}/d1.qcow2", X)],
    ),
    "raw": (
        storage("libvirt-1-storage", f"{LAB}/d1.raw")
        + fmt("libvirt-1-format", "libvirt-1-storage", False, "raw", with_backing=False)
        + device("libvirt-1-format"),
        [(f"{LAB}/d1.raw", X)],
    ),
    "readonly": (
        storage("libvirt-1-storage", f"{LAB}/ro.raw")
        + fmt("libvirt-1-format", "libvirt-1-storage", True, "raw", with_backing=False)
        + device("libvirt-1-format"),
        [(f"{LAB}/ro.raw", S)],
    ),
    "shareable": (
        storage("libvirt-1-storage", f"{LAB}/shared.raw", cache={"direct": True, "no-flush": False})
        + fmt("libvirt-1-format", "libvirt-1-storage", False, "raw", with_backing=False)
        + device("libvirt-1-format", **{"share-rw": True, "write-cache": "on"}),
        [(f"{LAB}/shared.raw", S)],
    ),
    "cdrom_media": (
        storage("libvirt-1-storage", f"{LAB}/media.iso")
        + fmt("libvirt-1-format", "libvirt-1-storage", True, "raw", with_backing=False)
        + device("libvirt-1-format", "ide-cd"),
        [(f"{LAB}/media.iso", S)],
    ),
    "cdrom_empty": (["-device", '{"driver":"ide-cd","bus":"ide.1","unit":0,"id":"ide0-1-0"}'], []),
    "weird_path": (
        storage("libvirt-1-storage", f"{LAB}/we,ird name.qcow2")
        + fmt("libvirt-1-format", "libvirt-1-storage", False)
        + device("libvirt-1-format"),
        [(f"{LAB}/we,ird name.qcow2", X)],
    ),
    "backing": (
        storage("libvirt-2-storage", f"{LAB}/base.qcow2")
        + fmt("libvirt-2-format", "libvirt-2-storage", True)
        + storage("libvirt-1-storage", f"{LAB}/overlay.qcow2")
        + fmt("libvirt-1-format", "libvirt-1-storage", False, backing="libvirt-2-format")
        + device("libvirt-1-format"),
        [(f"{LAB}/overlay.qcow2", X), (f"{LAB}/base.qcow2", S)],
    ),
    "block": (
        storage("libvirt-1-storage", "/dev/loop0", "host_device")
        + fmt("libvirt-1-format", "libvirt-1-storage", False, "raw", with_backing=False)
        + device("libvirt-1-format"),
        [("/dev/loop0", X)],
    ),
}


@pytest.mark.parametrize("name", sorted(LIBVIRT_CASES))
def test_libvirt_captures(name: str) -> None:
    argv, want = LIBVIRT_CASES[name]
    got = disks("-name", "guest=lab1,debug-threads=on", "-S", *argv)
    assert sorted(got) == sorted(want)


def test_libvirt_full_start_line() -> None:
    """The whole lab1 start line from the capture, with its non-disk options."""
    argv = [
        "-name", "guest=lab1,debug-threads=on", "-S",
        "-object", '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-1-lab1/master-key.aes"}',
        "-machine", "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
        "-accel", "tcg", "-cpu", "qemu64", "-m", "64",
        "-object", '{"qom-type":"memory-backend-ram","id":"pc.ram","size":67108864}',
        "-overcommit", "mem-lock=off", "-smp", "1,sockets=1,cores=1,threads=1",
        "-uuid", "d676c928-04bf-457e-9df6-ef0e7d76dd83", "-display", "none",
        "-no-user-config", "-nodefaults",
        "-chardev", "socket,id=charmonitor,fd=29,server=on,wait=off",
        "-mon", "chardev=charmonitor,id=monitor,mode=control", "-rtc", "base=utc",
        "-no-shutdown", "-no-acpi", "-boot", "strict=on",
        "-device", '{"driver":"piix3-usb-uhci","id":"usb","bus":"pci.0","addr":"0x1.0x2"}',
        *storage("libvirt-2-storage", f"{LAB}/d1.qcow2"),
        *fmt("libvirt-2-format", "libvirt-2-storage", False),
        *device("libvirt-2-format", bootindex=1),
        *storage("libvirt-1-storage", f"{LAB}/d1.raw"),
        *fmt("libvirt-1-format", "libvirt-1-storage", False, "raw", with_backing=False),
        *device("libvirt-1-format"),
        "-chardev", "pty,id=charserial0",
        "-device", '{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}',
        "-audiodev", '{"id":"audio1","driver":"none"}',
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-msg", "timestamp=on",
    ]  # fmt: skip
    plan = parse_argv(argv)
    assert [(d.path, d.mode, d.origin) for d in plan.disks] == [
        (f"{LAB}/d1.qcow2", X, "-blockdev libvirt-2-storage"),
        (f"{LAB}/d1.raw", X, "-blockdev libvirt-1-storage"),
    ]
    assert plan.guest == "lab1"
    assert plan.uuid == "d676c928-04bf-457e-9df6-ef0e7d76dd83"
    assert plan.skipped == ()


def test_probe_line_has_no_disks() -> None:
    argv = ["-S", "-no-user-config", "-nodefaults", "-nographic", "-machine", "none,accel=kvm:tcg",
            "-qmp", "unix:/var/lib/libvirt/qemu/qmp-I03JZ3/qmp.monitor,server=on,wait=off",
            "-pidfile", "/var/lib/libvirt/qemu/qmp-I03JZ3/qmp.pid", "-daemonize"]  # fmt: skip
    plan = parse_argv(argv)
    assert plan.disks == () and plan.daemonize


# -- -drive and the legacy options -------------------------------------------------

DRIVE_CASES = [
    (["-drive", "file=/i/a.qcow2"], [("/i/a.qcow2", X)]),
    (["--drive", "file=/i/a.qcow2,if=virtio"], [("/i/a.qcow2", X)]),
    (["-drive", "file=/i/a.img,readonly=on"], [("/i/a.img", S)]),
    (["-drive", "file=/i/a.img,readonly"], [("/i/a.img", S)]),
    (["-drive", "file=/i/a.img,readonly=off"], [("/i/a.img", X)]),
    (["-drive", "file=/i/a.img,snapshot=on"], [("/i/a.img", S)]),
    (["-snapshot", "-drive", "file=/i/a.img"], [("/i/a.img", S)]),
    (["-snapshot", "-drive", "file=/i/a.img,snapshot=off"], [("/i/a.img", X)]),
    (["-drive", "file=/i/a.iso,media=cdrom"], [("/i/a.iso", S)]),
    (
        [
            "-drive",
            "if=pflash,format=raw,readonly=on,file=/fw/code.fd",
            "-drive",
            "if=pflash,format=raw,file=/fw/vars.fd",
        ],
        [("/fw/code.fd", S), ("/fw/vars.fd", X)],
    ),
    (["-drive", "file=/i/a,,b.img,format=raw"], [("/i/a,b.img", X)]),
    (["-drive", "file=/i/sp ace.img"], [("/i/sp ace.img", X)]),
    (["-drive", "file=/i/ünï©ode.img"], [("/i/ünï©ode.img", X)]),
    (["-drive", "driver=qcow2,file.driver=file,file.filename=/i/d.qcow2"], [("/i/d.qcow2", X)]),
    (["-drive", "file.filename=/i/d.raw,file.driver=host_device,format=raw"], [("/i/d.raw", X)]),
    (["-drive", "file=file:/i/c:olon.img"], [("/i/c:olon.img", X)]),
    (["-drive", "file=./c:olon.img"], [("./c:olon.img", X)]),
    (
        ["-hda", 'json:{"driver":"qcow2","file":{"driver":"file","filename":"/i/j.qcow2"}}'],
        [("/i/j.qcow2", X)],
    ),
    (
        [
            "-drive",
            'file=json:{"driver":"raw",,"file":{"driver":"file",,"filename":"/i/j,,k.img"}}',
        ],
        [("/i/j,k.img", X)],
    ),
    (
        ["-drive", "file=/i/s.img,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0,share-rw=on"],
        [("/i/s.img", S)],
    ),
    (["-drive", "file=/i/c.img,if=none,id=cd", "-device", "ide-cd,drive=cd"], [("/i/c.img", S)]),
    (["-drive", "file=/i/a.img,if=none,id=d0", "-set", "drive.d0.readonly=on"], [("/i/a.img", S)]),
    (
        ["-hda", "/i/a.img", "-hdb", "/i/b.img", "-hdc", "/i/c.img", "-hdd", "/i/d.img"],
        [("/i/a.img", X), ("/i/b.img", X), ("/i/c.img", X), ("/i/d.img", X)],
    ),
    (["-hda", "/i/a,b.img"], [("/i/a,b.img", X)]),  # no QemuOpts escaping here
    (["-cdrom", "/i/x.iso"], [("/i/x.iso", S)]),
    (["-fda", "/i/f.img", "-fdb", "/i/g.img"], [("/i/f.img", X), ("/i/g.img", X)]),
    (["-pflash", "/i/vars.fd"], [("/i/vars.fd", X)]),
    (["-sd", "/i/sd.img", "-mtdblock", "/i/mtd.img"], [("/i/sd.img", X), ("/i/mtd.img", X)]),
    (["/i/positional.img"], [("/i/positional.img", X)]),
    (["-m", "1G", "/i/positional.img", "-snapshot"], [("/i/positional.img", S)]),
    (["-hda", "/i/a.img", "-drive", "file=/i/a.img,readonly=on"], [("/i/a.img", X)]),
    (
        ["-add-fd", "fd=7,set=2,opaque=rw", "-drive", "file=/dev/fdset/2,format=raw"],
        [("/proc/self/fd/7", X)],
    ),
]


@pytest.mark.parametrize(
    ("argv", "want"), DRIVE_CASES, ids=[" ".join(c[0])[:60] for c in DRIVE_CASES]
)
def test_drive_forms(argv: list[str], want: list[tuple[str, str]]) -> None:
    assert disks(*argv) == want


BLOCKDEV_CASES = [
    (["-blockdev", "driver=file,filename=/i/a.img,node-name=f0"], [("/i/a.img", X)]),
    (
        ["-blockdev", "driver=file,filename=/i/a,,b.img,node-name=f0,read-only=on"],
        [("/i/a,b.img", S)],
    ),
    (
        ["-blockdev", "driver=qcow2,node-name=q,file.driver=file,file.filename=/i/q.qcow2"],
        [("/i/q.qcow2", X)],
    ),
    (
        [
            "-blockdev",
            bd(
                driver="qcow2",
                **{"node-name": "q"},
                file={"driver": "file", "filename": "/i/q"},
                backing={"driver": "qcow2", "file": {"driver": "file", "filename": "/i/b"}},
            ),
        ],
        [("/i/q", X), ("/i/b", S)],
    ),
    (
        [
            "-blockdev",
            bd(
                driver="qcow2",
                **{"node-name": "q", "data-file": {"driver": "file", "filename": "/i/data"}},
                file={"driver": "file", "filename": "/i/meta"},
                backing=None,
            ),
        ],
        [("/i/meta", X), ("/i/data", X)],
    ),
    # A raw slice of a file plus the same file as a backing: one entry, the strongest mode.
    (
        [
            "-blockdev",
            bd(driver="file", filename="/i/disk", **{"node-name": "f"}),
            "-blockdev",
            bd(driver="raw", offset=0, size=512, file="f", **{"node-name": "slice"}),
            "-blockdev",
            bd(
                driver="qcow2",
                backing={"driver": "raw", "file": {"driver": "file", "filename": "/i/disk"}},
                file={"driver": "file", "filename": "/i/top"},
                **{"node-name": "t"},
            ),
        ],
        [("/i/disk", X), ("/i/top", X)],
    ),
    # pflash through -machine: nodes attached to no -device still count.
    (
        [
            "-blockdev",
            bd(driver="file", filename="/fw/code.fd", **{"node-name": "c", "read-only": True}),
            "-blockdev",
            bd(driver="file", filename="/fw/vars.fd", **{"node-name": "v"}),
            "-machine",
            "q35,pflash0=c,pflash1=v",
        ],
        [("/fw/code.fd", S), ("/fw/vars.fd", X)],
    ),
    (
        [
            "-blockdev",
            bd(
                driver="quorum",
                **{"node-name": "qu"},
                children=[
                    {"driver": "file", "filename": "/i/c1"},
                    {"driver": "file", "filename": "/i/c2"},
                ],
            ),
        ],
        [("/i/c1", X), ("/i/c2", X)],
    ),
    (
        [
            "-blockdev",
            "driver=throttle,node-name=t,throttle-group=g,file.driver=file,file.filename=/i/t",
        ],
        [("/i/t", X)],
    ),
    (
        [
            "-blockdev",
            bd(driver="host_cdrom", filename="/dev/sr0", **{"node-name": "cd", "read-only": True}),
        ],
        [("/dev/sr0", S)],
    ),
    (
        ["-blockdev", "{'driver':'file','filename':'/i/single-quoted','node-name':'sq'}"],
        [("/i/single-quoted", X)],
    ),
]


@pytest.mark.parametrize(
    ("argv", "want"), BLOCKDEV_CASES, ids=[str(i) for i in range(len(BLOCKDEV_CASES))]
)
def test_blockdev_forms(argv: list[str], want: list[tuple[str, str]]) -> None:
    assert disks(*argv) == want


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["-drive", "file=nbd://host:10809/export"], "network disk (nbd)"),
        (["-drive", "file=nbd:unix:/tmp/s"], "network disk (nbd)"),
        (["-drive", "file=rbd:pool/image"], "network disk (rbd)"),
        (["-drive", "file=iscsi://h/iqn.x/1"], "network disk (iscsi)"),
        (["-drive", "file=gluster+tcp://h/v/i"], "network disk (gluster)"),
        (["-drive", "file=https://example.invalid/x.iso,media=cdrom"], "network disk (https)"),
        (
            [
                "-blockdev",
                bd(
                    driver="nbd",
                    server={"type": "inet", "host": "h", "port": "1"},
                    **{"node-name": "n"},
                ),
            ],
            "network disk (nbd)",
        ),
        (
            [
                "-blockdev",
                bd(driver="nvme", device="0000:01:00.0", namespace=1, **{"node-name": "n"}),
            ],
            "device passthrough",
        ),
        (
            [
                "-blockdev",
                bd(driver="virtio-blk-vhost-user", path="/run/vu.sock", **{"node-name": "n"}),
            ],
            "device passthrough",
        ),
        (["-drive", "file=fat:rw:/some/dir"], "vvfat"),
        (["-blockdev", "driver=null-co,node-name=n"], "no storage"),
        (["-drive", "if=none,id=empty"], "no medium"),
        (["-cdrom", ""], "no medium"),
    ],
)
def test_skipped_with_reason(argv: list[str], reason: str) -> None:
    plan = parse_argv(argv)
    assert plan.disks == ()
    assert any(reason in s.reason for s in plan.skipped), plan.skipped


@pytest.mark.parametrize(
    "argv",
    [
        ["-name", "guest=/not/a/disk.img"],
        ["-chardev", "file,id=c,path=/not/a/disk.img"],
        ["-object", '{"qom-type":"secret","id":"s","file":"/not/a/disk.img"}'],
        ["-kernel", "/boot/vmlinuz", "-initrd", "/boot/initrd.img", "-append", "/not/a/disk.img"],
        ["-bios", "/usr/share/seabios/bios.bin", "-L", "/usr/share/qemu"],
        ["-serial", "file:/tmp/serial.log", "-pidfile", "/run/x.pid", "-D", "/tmp/log"],
        ["-incoming", "defer", "-loadvm", "snap1", "-mem-path", "/dev/hugepages"],
        ["-append", "-drive file=/x.img"],
        ["-fw_cfg", "name=opt/x,file=/not/a/disk.img", "-dtb", "/x.dtb"],
        ["-version"],
        ["--help"],
        ["-h"],
    ],
)
def test_values_that_look_like_paths_are_not_disks(argv: list[str]) -> None:
    assert parse_argv(argv).disks == ()


@pytest.mark.parametrize(
    "opt", ["-drive", "-blockdev", "-hda", "-name", "-device", "-m", "-cdrom", "--drive"]
)
def test_missing_value_at_end(opt: str) -> None:
    with pytest.raises(ArgumentError) as exc:
        parse_argv(["-m", "64", opt])
    assert exc.value.exit_code == 2
    assert opt in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["-blockdev", "{not json"],
        ["-blockdev", '{"driver":"file","filename":"/x"}'],  # no node-name
        ["-blockdev", '{"driver":"qcow2","node-name":"a","file":"missing"}'],
        ["-blockdev", '{"driver":"qcow2","node-name":"a","file":"a"}'],  # refers to itself
        ["-blockdev", '{"driver":"file","node-name":"a"}'],  # no filename
        ["-drive", "file=/x,readonly=maybe"],
        ["-drive", "file=/dev/fdset/9"],
        ["-drive", 'file=json:{"driver":'],
        # inside -drive, JSON commas must be doubled like any other
        ["-drive", 'file=json:{"driver":"qcow2","file":{"driver":"file","filename":"/i/j.qcow2"}}'],
        ["-add-fd", "fd=3"],
        ["-set", "nonsense"],
        ["-blockdev", "[1,2]"],
    ],
)
def test_bad_arguments_are_one_line_errors(argv: list[str]) -> None:
    with pytest.raises(QemuLockedError) as exc:
        parse_argv(argv)
    assert exc.value.exit_code == 2
    assert len(exc.value.lines()) == 1


def test_readconfig_drive_sections() -> None:
    cfg = '# comment\n[drive]\n  file = "/i/rc.img"\n  if = "virtio"\n\n[drive "d1"]\n  file = "/i/ro.img"\n  readonly = "on"\n'
    assert disks("-readconfig", "/etc/vm.cfg", read_config=lambda p: cfg) == [
        ("/i/rc.img", X),
        ("/i/ro.img", S),
    ]


def test_readconfig_bad_syntax() -> None:
    with pytest.raises(ArgumentError):
        parse_argv(["-readconfig", "x"], lambda p: "[drive]\nfile = unquoted\n")


def test_split_opts_escapes() -> None:
    assert split_opts("file=a,,b,if=none,readonly") == [
        ("file", "a,b"),
        ("if", "none"),
        ("readonly", "on"),
    ]
    assert split_opts("virtio-blk,drive=x", "driver") == [("driver", "virtio-blk"), ("drive", "x")]
    assert split_opts("guest=a=b") == [("guest", "a=b")]


def test_guest_name_forms() -> None:
    assert parse_argv(["-name", "plain"]).guest == "plain"
    assert parse_argv(["-name", "guest=g,debug-threads=on"]).guest == "g"
    assert parse_argv(["-incoming", "defer"]).incoming == "defer"


def test_same_node_attached_and_shared() -> None:
    """share-rw on the device makes the writable image shared, not exclusive."""
    argv = (
        storage("s", "/i/x.raw")
        + fmt("f", "s", False, "raw", with_backing=False)
        + device("f", **{"share-rw": True})
    )
    assert disks(*argv) == [("/i/x.raw", S)]


def test_implicit_backing_is_marked_for_probing() -> None:
    plan = parse_argv(["-drive", "file=/i/overlay.qcow2"])
    assert plan.disks[0].probe_backing
    explicit = storage("s", "/i/o.qcow2") + fmt("f", "s", False)  # "backing": null
    assert not parse_argv(explicit).disks[0].probe_backing


# -- properties ---------------------------------------------------------------------

OPTION_NAMES = ["-drive", "-blockdev", "-device", "-hda", "-cdrom", "-name", "-m", "-snapshot",
                "-add-fd", "-set", "-readconfig", "-object", "-uuid", "-incoming", "--drive", "-"]  # fmt: skip
token = st.one_of(
    st.sampled_from(OPTION_NAMES),
    st.text(min_size=0, max_size=40),
    st.sampled_from(
        [
            "file=/x",
            "file=json:{",
            "{",
            '{"driver":"file"}',
            "driver=file,node-name=a",
            "file=/dev/fdset/1",
            ",,",
            "if=none,id=a",
            "drive=a,share-rw=on",
        ]
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(token, max_size=12))
def test_never_crashes(argv: list[str]) -> None:
    """Any argv gives a plan or one QemuLockedError line — never another exception."""
    try:
        plan = parse_argv(argv, read_config=lambda p: "[drive]\n")
    except QemuLockedError as exc:
        assert len(exc.lines()) == 1
        return
    for d in plan.disks:
        assert d.mode in (X, S) and d.path


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.just(","), st.just(",,"), st.just("="),
                  st.text(alphabet=st.characters(blacklist_characters="\0"), max_size=8)),
        min_size=1, max_size=8,
    ).map("".join).filter(lambda s: s.strip() == s and s)
)  # fmt: skip
@example(",")
@example("a,b")
@example("a,,b,")
@example(",format=qcow2")
def test_drive_file_roundtrip(name: str) -> None:
    """Any file name -- commas included, the case the escaping exists for --
    doubled into -drive, comes back verbatim (and no ',' in it starts an option)."""
    path = "/img/" + name
    got = parse_argv(["-drive", "file=" + path.replace(",", ",,") + ",format=raw"]).disks
    assert [d.path for d in got] == [path]


def test_bookkeeping_files_come_from_the_one_argv_walk() -> None:
    """Files QEMU's own options name (the supervisor lets their opens pass: QEMU
    lockf()s a -pidfile whole), found by the same walk that finds the disks."""
    plan = parse_argv(["-pidfile", "/run/x.pid", "--D", "log.txt", "-drive", "file=/d.img",
                       "-chardev", "socket,id=m,path=/s.sock,server=on,logfile=/m.log",
                       "-serial", "file:/ser.out", "-monitor", "pipe:/mon", "-qmp", "unix:/q.sock",
                       "-trace", "enable=x*,file=/t.out"])  # fmt: skip
    assert plan.bookkeeping == ("/run/x.pid", "log.txt", "/s.sock", "/m.log", "/ser.out", "/mon",
                                "/t.out")  # fmt: skip
    assert [d.path for d in plan.disks] == ["/d.img"]
