"""QEMU's command-line rules in the pure argv walk (no QEMU needed; test_qemu_forms.py
runs the same forms through the real binary)."""

from __future__ import annotations

import pytest

from qemu_locked.model.errors import ArgumentError
from qemu_locked.parse.argv import parse_argv


def disks(*args: str, **kw: object) -> dict[str, str]:
    return {d.path: d.mode for d in parse_argv(list(args), **kw).disks}  # type: ignore[arg-type]


def reasons(*args: str, **kw: object) -> list[str]:
    return [s.reason for s in parse_argv(list(args), **kw).skipped]  # type: ignore[arg-type]


def test_value_is_the_next_argument_verbatim() -> None:
    assert disks("-name", "-drive", "-drive", "file=a.img") == {"a.img": "exclusive"}
    assert disks("-name", "", "b.img") == {"b.img": "exclusive"}
    assert disks("--drive", "file=a.img", "--snapshot") == {"a.img": "shared"}


def test_options_of_every_release_take_their_value() -> None:
    for opt, value in [("-run-with", "async-teardown=on"), ("-shim", "/x/shim.efi"),
                       ("-realtime", "mlock=off"), ("-hdachs", "1,2,3"), ("-tftp", "/srv")]:  # fmt: skip
        assert disks(opt, value) == {}, opt
    # -async-teardown takes none: the next argument is an option again
    assert disks("-async-teardown", "c.img") == {"c.img": "exclusive"}


def test_unknown_options_are_asked() -> None:
    answers = {"zz-new": "arg", "zz-flag": "none", "zz-bad": "unknown"}
    asked: list[str] = []

    def arity(name: str) -> str:
        asked.append(name)
        return answers[name]

    assert disks("-zz-new", "v.img", "-zz-flag", "w.img", arity=arity) == {"w.img": "exclusive"}
    assert asked == ["zz-new", "zz-flag"]
    with pytest.raises(ArgumentError, match="invalid option"):
        parse_argv(["-zz-bad"], arity=arity)
    with pytest.raises(ArgumentError, match="no QEMU binary to ask"):
        parse_argv(["-zz-new", "v.img"])


def test_implied_driver_of_blockdev() -> None:
    assert disks("-blockdev", "file,filename=a.img,node-name=f") == {"a.img": "exclusive"}
    assert disks("-blockdev", "host_device,filename=/dev/sdz,node-name=d") == {
        "/dev/sdz": "exclusive"
    }


def test_file_value_beside_file_options() -> None:
    assert disks("-drive", "file=a.img,file.aio=threads") == {"a.img": "exclusive"}
    assert reasons("-drive", "file=gluster://h/v/i,file.debug=4") == [
        "network disk (gluster): not a local file"
    ]


def test_driverless_nodes_are_probed_images() -> None:
    assert disks("-drive", "file.filename=a.img") == {"a.img": "exclusive"}
    assert disks("-drive", "driver=qcow2,file.filename=t.qcow2,backing.file.filename=b.img") == {
        "t.qcow2": "exclusive",
        "b.img": "shared",
    }
    got = parse_argv(["-drive", "file=t.qcow2,backing.node-name=mid"]).disks
    assert [(d.path, d.mode, d.probe_backing) for d in got] == [("t.qcow2", "exclusive", True)]
    assert disks("-drive", "driver=quorum,vote-threshold=1,children.0.file.filename=q.img") == {
        "q.img": "exclusive"
    }


def test_inline_node_name_used_later() -> None:
    argv = ["-blockdev", "driver=qcow2,node-name=fmt,file.driver=file,file.node-name=f,"
            "file.filename=t.qcow2", "-blockdev", "driver=raw,node-name=r,file=f"]  # fmt: skip
    assert disks(*argv) == {"t.qcow2": "exclusive"}
    with pytest.raises(ArgumentError, match="defined twice"):
        parse_argv(["-blockdev", "driver=raw,node-name=x,file.driver=file,file.filename=a,"
                    "file.node-name=x"])  # fmt: skip


def test_force_share() -> None:
    assert disks("-drive", "file=a.img,readonly=on,force-share=on") == {}
    assert reasons("-drive", "file=a.img,readonly=on,force-share=on") == [
        "force-share=on: read without a lock, writers allowed (as QEMU does)"
    ]
    with pytest.raises(ArgumentError, match="only be used with read-only images"):
        parse_argv(["-drive", "file=a.img,force-share=on"])
    json_reader = (
        '{"driver":"file","filename":"j.img","node-name":"n","read-only":true,"force-share":true}'
    )
    assert disks("-blockdev", json_reader) == {}


def test_locking_off() -> None:
    argv = ["-drive", "file=a.img,format=raw,file.locking=off"]
    assert disks(*argv) == {}
    assert disks(*argv, honor_locking_off=False) == {"a.img": "exclusive"}
    assert disks("-drive", "file=a.img,format=raw,file.locking=on") == {"a.img": "exclusive"}


def test_default_config_file() -> None:
    conf = '[drive]\n  file = "u.img"\n'
    assert disks("-m", "64", user_config=lambda: conf) == {"u.img": "exclusive"}
    assert disks("-m", "64", "-no-user-config", user_config=lambda: conf) == {}
    # as a value, -no-user-config is no option
    assert disks("-name", "-no-user-config", user_config=lambda: conf) == {"u.img": "exclusive"}
    assert disks("-m", "64", user_config=lambda: None) == {}


def test_missing_value_and_bad_values() -> None:
    with pytest.raises(ArgumentError, match="requires an argument"):
        parse_argv(["-drive"])
    with pytest.raises(ArgumentError, match="not on/off"):
        parse_argv(["-drive", "file=a.img,readonly=bogus"])


def test_the_monitor_libvirt_hands_over_is_found_by_the_one_argv_walk() -> None:
    def monitor(*args: str) -> int | None:
        return parse_argv(list(args)).monitor_fd

    libvirt = ["-chardev", "socket,id=charmonitor,fd=27,server=on,wait=off",
               "-mon", "chardev=charmonitor,id=monitor,mode=control"]  # fmt: skip
    assert monitor(*libvirt) == 27
    # the value of an option is never an option: a -chardev word inside -name is no monitor
    assert monitor("-name", "-chardev", *libvirt[2:]) is None
    assert monitor(libvirt[0], libvirt[1].replace("server=on", "server=off"), *libvirt[2:]) is None
    assert monitor(*libvirt[:2], "-mon", "chardev=charmonitor,mode=readline") is None
    assert (
        monitor("-qmp", "unix:/run/q.sock,server=on,wait=off") is None
    )  # by path: not handed over
    # the roles the config drops keep it (the plan is rebuilt with replace)
    assert parse_argv(libvirt).apply_roles(("readonly",)).monitor_fd == 27
