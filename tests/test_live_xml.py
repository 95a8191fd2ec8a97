"""The ORIGIN column names a device only while libvirt's live XML still lists the
file as its source (issue 23: it named a disk that was detached, and called a new
cdrom medium `blockdev-add libvirt-3-storage`).  The XML is in the shape libvirt 9
writes to /run/libvirt/qemu/NAME.xml (a <domstatus> around the live <domain>)."""

from __future__ import annotations

from qemu_locked.admin.live_xml import exact, names_in, read

LIVE = b"""<domstatus state='running' reason='booted' pid='4242'>
  <domain type='kvm' id='7'>
    <name>web</name>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='/var/lib/libvirt/images/web.qcow2' index='2'/>
        <backingStore type='file' index='3'>
          <format type='qcow2'/>
          <source file='/var/lib/libvirt/images/base.qcow2'/>
          <backingStore/>
        </backingStore>
        <target dev='vda' bus='virtio'/>
        <alias name='virtio-disk0'/>
      </disk>
      <disk type='file' device='disk'>
        <source file='/var/lib/libvirt/images/data.qcow2' index='4'/>
        <target dev='sdb' bus='scsi'/>
        <alias name='scsi0-0-0-1'/>
      </disk>
      <disk type='file' device='cdrom'>
        <source file='/srv/iso/new.iso' index='5'/>
        <target dev='hdc' bus='ide'/>
        <readonly/>
        <alias name='ide0-1-0'/>
      </disk>
      <disk type='network' device='disk'>
        <source protocol='nbd' name='export'><host name='nbd.example' port='10809'/></source>
        <target dev='vdb' bus='virtio'/>
      </disk>
    </devices>
  </domain>
</domstatus>
"""


def test_names_of_the_live_sources() -> None:
    assert names_in(LIVE) == {
        "/var/lib/libvirt/images/web.qcow2": "disk vda",
        "/var/lib/libvirt/images/base.qcow2": "disk vda backing",
        "/var/lib/libvirt/images/data.qcow2": "disk sdb",
        "/srv/iso/new.iso": "cdrom hdc medium",
    }
    # the network disks, attached at start or since: listed as not locked by status
    assert read(LIVE).network == (("nbd://nbd.example:10809/export", "disk vdb"),)


def test_origins_name_only_what_the_domain_still_has() -> None:
    names = names_in(LIVE)
    web, base = "/var/lib/libvirt/images/web.qcow2", "/var/lib/libvirt/images/base.qcow2"
    data, iso = "/var/lib/libvirt/images/data.qcow2", "/srv/iso/new.iso"
    gone = "/var/lib/libvirt/images/detached.qcow2"
    # start-time arguments, with the device they are
    assert exact("-blockdev libvirt-2-storage", web, names) == (
        "disk vda (-blockdev libvirt-2-storage)"
    )
    assert exact("-blockdev libvirt-3-storage", base, names) == (
        "disk vda backing (-blockdev libvirt-3-storage)"
    )
    # the QMP guard's hot-plug: by the name libvirt shows, while attached
    assert exact("hot-plug scsi0-0-0-1", data, names) == "hot-plug sdb"
    # detached since (QEMU still has it open): no device named, not even the alias
    assert exact("hot-plug scsi0-0-0-1", gone, names) == "hot-plug, since detached"
    # a new cdrom medium is the medium, not the blockdev-add that opened it
    assert exact("blockdev-add libvirt-5-storage", iso, names) == "cdrom hdc medium (after start)"
    # the supervisor sees opens: the device when the live XML has the file, else only that
    assert exact("opened after start", data, names) == "disk sdb (after start)"
    assert exact("opened after start", gone, names) == "opened after start"
    # no live XML (not libvirt, or not root): as published
    assert exact("hot-plug scsi0-0-0-1", data, None) == "hot-plug scsi0-0-0-1"
