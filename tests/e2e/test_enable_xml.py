"""The XML edit behind ``qemu-lockctl libvirt enable/disable``, without libvirt
(the byte-identical round trip through a real libvirtd is in test_libvirt.py)."""

from __future__ import annotations

import pytest
from lxml import etree

from qemu_locked.admin.libvirt import (
    ENV_NAME,
    QEMU_NS,
    disable_xml,
    enable_xml,
    recorded_emulator,
)
from qemu_locked.model.errors import UsageError

WRAPPER = "/opt/qemu-locked/bin/qemu-locked"
PLAIN = """<domain type='kvm'>
  <name>web</name>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
  </devices>
</domain>
"""
CUSTOM = """<domain type='kvm' xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>db</name>
  <devices>
    <emulator>/usr/libexec/qemu-kvm</emulator>
  </devices>
  <q:commandline>
    <q:arg value='-no-reboot'/>
    <q:env name='OTHER' value='1'/>
  </q:commandline>
</domain>
"""


def envs(xml: bytes) -> list[tuple[str | None, str | None]]:
    root = etree.fromstring(xml)
    return [(e.get("name"), e.get("value")) for e in root.iter(f"{{{QEMU_NS}}}env")]


def test_enable_points_emulator_at_the_wrapper_and_records_the_original() -> None:
    out = enable_xml(PLAIN, "web", WRAPPER)
    assert out is not None
    root = etree.fromstring(out)
    assert root.findtext("devices/emulator") == WRAPPER
    assert root.nsmap["qemu"] == QEMU_NS
    assert envs(out) == [(ENV_NAME, "/usr/bin/qemu-system-x86_64")]
    assert recorded_emulator(out.decode()) == "/usr/bin/qemu-system-x86_64"
    assert root.findtext("name") == "web"


def test_enable_keeps_an_existing_qemu_commandline_and_its_prefix() -> None:
    out = enable_xml(CUSTOM, "db", WRAPPER)
    assert out is not None
    assert envs(out) == [("OTHER", "1"), (ENV_NAME, "/usr/libexec/qemu-kvm")]
    root = etree.fromstring(out)
    assert len(root.findall(f"{{{QEMU_NS}}}commandline")) == 1
    assert b'<q:arg value="-no-reboot"/>' in out


def test_disable_undoes_enable() -> None:
    for xml, name in ((PLAIN, "web"), (CUSTOM, "db")):
        on = enable_xml(xml, name, WRAPPER)
        assert on is not None
        off = disable_xml(on.decode(), name)
        assert off is not None
        c14n = etree.tostring(etree.fromstring(off), method="c14n")
        assert c14n == etree.tostring(etree.fromstring(xml.encode()), method="c14n")
        assert ENV_NAME.encode() not in off


def test_idempotent_and_refusals() -> None:
    on = enable_xml(PLAIN, "web", WRAPPER)
    assert on is not None
    assert enable_xml(on.decode(), "web", WRAPPER) is None
    assert disable_xml(PLAIN, "web") is None
    with pytest.raises(UsageError, match="records an original"):
        enable_xml(on.decode(), "web", "/elsewhere/qemu-locked")
    bare = PLAIN.replace("/usr/bin/qemu-system-x86_64", WRAPPER)
    with pytest.raises(UsageError, match="no original emulator"):
        enable_xml(bare, "web", WRAPPER)
    with pytest.raises(UsageError, match="records no original emulator"):
        disable_xml(bare, "web")
    with pytest.raises(UsageError, match="no <devices><emulator>"):
        enable_xml("<domain><name>x</name></domain>", "x", WRAPPER)
    with pytest.raises(UsageError, match="does not parse"):
        enable_xml("<domain", "x", WRAPPER)
    with pytest.raises(UsageError, match="not a domain"):
        enable_xml("<network/>", "x", WRAPPER)


def test_no_entity_expansion() -> None:
    evil = '<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>' + PLAIN.replace(
        "<name>web</name>", "<name>&x;</name>"
    )
    out = enable_xml(evil, "web", WRAPPER)
    assert out is None or b"root:" not in out
