"""qemu-lockctl libvirt ...: put libvirt domains under qemu-locked and back.

``enable`` edits a domain's persistent XML in two places and nowhere else:

* ``<emulator>`` becomes the qemu-locked launcher;
* ``<qemu:commandline><qemu:env name='QEMU_LOCKED_EMULATOR' value='ORIGINAL'/>``
  records the emulator it replaced, so the wrapper execs exactly that binary
  (and ``disable`` knows what to put back).  libvirt keeps the element across
  redefinitions and passes it to the emulator's environment.

``disable`` undoes both.  libvirt formats a domain's XML canonically, so the
inactive XML after ``disable`` is byte-identical to the one before ``enable``.

It talks to libvirt through the ``virsh`` client (libvirt-clients), not the
Python binding: virsh is on every libvirt host, needs no compiled module in
our virtualenv, and its ``dumpxml --inactive`` / ``define`` pair is exactly the
round trip this needs.  Changes take effect the next time a domain starts.

The host-wide alternative (no per-domain XML): divert the real binary and put
qemu-locked in its place, e.g.::

    dpkg-divert --local --rename --divert /usr/bin/qemu-system-x86_64.real \\
        --add /usr/bin/qemu-system-x86_64
    ln -s /opt/qemu-locked/bin/qemu-locked /usr/bin/qemu-system-x86_64

The emulator lookup then finds ``qemu-system-x86_64.real`` next to the link.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any, Optional

import typer
from lxml import etree

from qemu_locked.admin import apparmor
from qemu_locked.model.errors import BackendError, QemuLockedError, UsageError

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ENV_NAME = "QEMU_LOCKED_EMULATOR"
DEFAULT_URI = "qemu:///system"
_Q = f"{{{QEMU_NS}}}"

libvirt_app = typer.Typer(
    help="Put libvirt domains under qemu-locked (enable) and back (disable).",
    no_args_is_help=True,
)

# Defaults-style typer parameters: see JSON_OPT in qemu_locked.admin.cli.
DOMAINS_ARG: Any = typer.Argument(None, help="Domain names (or UUIDs).")
ALL_OPT: Any = typer.Option(False, "--all", help="Every persistent domain.")
CONNECT_OPT: Any = typer.Option(
    DEFAULT_URI, "--connect", "-c", envvar="LIBVIRT_DEFAULT_URI", help="libvirt URI (virsh -c)."
)
EMULATOR_OPT: Any = typer.Option(
    None,
    "--emulator",
    help="The qemu-locked to use (default: the qemu-locked next to this qemu-lockctl).",
)


class VirshError(BackendError):
    """virsh failed; the message is virsh's own error, on one line."""


# -- virsh --------------------------------------------------------------------


def _virsh_path() -> str:
    path = shutil.which("virsh")
    if path is None:
        raise BackendError("virsh not found on PATH (Debian: apt-get install libvirt-clients)")
    return path


def virsh(uri: str, *args: str) -> str:
    """Run ``virsh -c URI ARGS`` (an argument list, never a shell); its stdout."""
    cmd = [_virsh_path(), "-c", uri, "-q", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise VirshError(f"virsh {args[0]}: no answer from libvirt within 120 s") from None
    except OSError as exc:
        raise VirshError(f"virsh: {exc.strerror}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        text = "; ".join(ln.removeprefix("error: ") for ln in lines) or f"exit {proc.returncode}"
        raise VirshError(f"virsh {args[0]}: {text}")
    return proc.stdout


def persistent_domains(uri: str) -> list[str]:
    return [n for n in virsh(uri, "list", "--all", "--persistent", "--name").split() if n]


def dumpxml(uri: str, name: str) -> str:
    """The persistent XML, secrets included (e.g. a VNC password): what is defined
    back must lose nothing.  A transient domain has none: defining its XML would
    make it persistent, so it is refused."""
    for line in virsh(uri, "dominfo", name).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Persistent" and value.strip() == "no":
            raise UsageError(
                f"domain {name} is transient (not defined): nothing persistent to change; "
                f"start it with the emulator you want"
            )
    return virsh(uri, "dumpxml", "--inactive", "--security-info", name)


def define(uri: str, xml: bytes) -> None:
    fd, path = tempfile.mkstemp(prefix="qemu-lockctl-", suffix=".xml")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(xml)
        virsh(uri, "define", path)
    finally:
        os.unlink(path)


# -- the XML edit (pure) ---------------------------------------------------------


def _parse(xml: str) -> etree._Element:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=False)
    try:
        root = etree.fromstring(xml.encode(), parser)
    except etree.XMLSyntaxError as exc:
        raise UsageError(f"domain XML does not parse: {exc}") from None
    if root.tag != "domain":
        raise UsageError(f"not a domain XML (root element <{root.tag}>)")
    return root


def _emulator(root: etree._Element, name: str) -> etree._Element:
    found = root.findall("devices/emulator")
    if len(found) != 1 or not (found[0].text or "").strip():
        raise UsageError(f"domain {name}: no <devices><emulator> to replace")
    return found[0]


def _our_envs(root: etree._Element) -> list[etree._Element]:
    return [
        env
        for cmdline in root.findall(f"{_Q}commandline")
        for env in cmdline.findall(f"{_Q}env")
        if env.get("name") == ENV_NAME
    ]


def recorded_emulator(xml: str) -> str | None:
    """The original emulator a domain under qemu-locked records, else None."""
    envs = _our_envs(_parse(xml))
    return envs[0].get("value") if envs else None


def _with_qemu_ns(root: etree._Element) -> etree._Element:
    """The same tree with the qemu namespace declared on <domain> (lxml cannot add
    a declaration in place; libvirt itself puts it there)."""
    if QEMU_NS in root.nsmap.values():
        return root
    nsmap: dict[str, str] = {k: v for k, v in root.nsmap.items() if k is not None}
    prefix = "qemu" if "qemu" not in nsmap else "qemulocked"
    nsmap[prefix] = QEMU_NS
    attrib = {str(k): str(v) for k, v in root.attrib.items()}
    new = etree.Element(root.tag, attrib=attrib, nsmap=nsmap)
    new.text = root.text
    for child in root:
        new.append(child)
    return new


def enable_xml(xml: str, name: str, wrapper: str) -> bytes | None:
    """The domain XML under qemu-locked, or None if it already is."""
    root = _parse(xml)
    emulator = _emulator(root, name)
    original = (emulator.text or "").strip()
    if _our_envs(root):
        if original != wrapper:
            raise UsageError(
                f"domain {name}: records an original emulator but runs {original}: "
                f"fix its XML by hand (virsh edit)"
            )
        return None
    if os.path.basename(original) == "qemu-locked" or original == wrapper:
        raise UsageError(
            f"domain {name}: already runs {original}, with no original emulator "
            f"recorded: nothing to enable"
        )
    root = _with_qemu_ns(root)
    emulator = _emulator(root, name)
    emulator.text = wrapper
    cmdlines = root.findall(f"{_Q}commandline")
    cmdline = cmdlines[-1] if cmdlines else etree.SubElement(root, f"{_Q}commandline")
    etree.SubElement(cmdline, f"{_Q}env", name=ENV_NAME, value=original)
    return etree.tostring(root, encoding="utf-8")


def disable_xml(xml: str, name: str) -> bytes | None:
    """The domain XML with qemu-locked taken out again, or None if it is not in."""
    root = _parse(xml)
    emulator = _emulator(root, name)
    envs = _our_envs(root)
    if not envs:
        if os.path.basename((emulator.text or "").strip()) == "qemu-locked":
            raise UsageError(
                f"domain {name}: runs qemu-locked but records no original emulator "
                f"(no {ENV_NAME} in <qemu:commandline>): set <emulator> by hand (virsh edit)"
            )
        return None
    original = envs[0].get("value") or ""
    if not original.startswith("/"):
        raise UsageError(f"domain {name}: recorded emulator {original!r} is not an absolute path")
    emulator.text = original
    for env in envs:
        cmdline = env.getparent()
        assert cmdline is not None
        cmdline.remove(env)
        if len(cmdline) == 0:
            parent = cmdline.getparent()
            assert parent is not None
            parent.remove(cmdline)
    etree.cleanup_namespaces(root)  # drops xmlns:qemu when nothing uses it any more
    return etree.tostring(root, encoding="utf-8")


# -- the commands -----------------------------------------------------------------


def default_wrapper() -> str:
    """The qemu-locked installed beside the running qemu-lockctl."""
    here = os.path.dirname(os.path.abspath(sys.argv[0]))
    for d in (here, os.path.dirname(sys.executable)):
        cand = os.path.join(d, "qemu-locked")
        if os.path.isfile(cand):
            return cand
    raise UsageError(f"no qemu-locked next to {sys.argv[0]}: give --emulator PATH")


def check_wrapper(path: str) -> str:
    """The qemu-locked to put in <emulator>: absolute, executable, and usable by
    the user libvirt runs QEMU as (qemu.conf ``user``); refused otherwise, since
    every start of the domain would then fail."""
    from qemu_locked.admin import vmuser
    from qemu_locked.model.errors import EmulatorNotExecutable, EmulatorNotFound
    from qemu_locked.start import emulator

    if not path.startswith("/"):
        raise UsageError(f"--emulator {path}: must be an absolute path")
    try:
        emulator.check_executable(path)
    except (EmulatorNotFound, EmulatorNotExecutable) as exc:
        raise UsageError(f"--{exc.message}") from None
    user = vmuser.User.lookup(vmuser.vm_user_name())
    if user is not None:
        why = vmuser.launcher_denied(path, user)
        if why:
            raise UsageError(
                f"{why}: libvirt runs QEMU as {user.name}, so every start would fail; "
                "install the package (README.md, Install) or give --emulator a launcher "
                f"{user.name} can run"
            )
    return path


def check_lock_manager(uri: str) -> None:
    """libvirt's lockd with direct disk leases refuses every start under qemu-locked,
    whatever the backend (each takes the disk's byte 0).  A warning, not a
    refusal: the fix is in libvirt's configuration (LOCKD_FIX)."""
    from qemu_locked.admin import vmuser
    from qemu_locked.model import config as _config

    why = vmuser.lockd_takes_disks() if uri.startswith("qemu") else None
    if why:
        backend = _config.load().backend
        sys.stderr.write(f"qemu-lockctl: warning: {why} (backend {backend}): {vmuser.LOCKD_FIX}\n")


def _targets(uri: str, domains: list[str] | None, all_: bool) -> list[str]:
    if all_ and domains:
        raise UsageError("give domain names or --all, not both")
    if all_:
        return persistent_domains(uri)
    if not domains:
        raise UsageError("no domain given: name one or more, or use --all")
    return domains


def _when(uri: str, name: str) -> str:
    """A note for a running domain: the change applies from its next start."""
    try:
        running = virsh(uri, "domid", name).strip() not in ("", "-")
    except VirshError:
        return ""
    return "; running now, takes effect at its next start" if running else ""


def _each(names: list[str], action: str, step: Callable[[str], None]) -> None:
    """Run ``step`` on every domain; report each failure, fail at the end."""
    if len(names) == 1:
        step(names[0])
        return
    failed: list[QemuLockedError] = []
    for name in names:
        try:
            step(name)
        except QemuLockedError as exc:
            for line in exc.lines():
                sys.stderr.write(f"qemu-lockctl: {line}\n")
            failed.append(exc)
    if failed:
        error = BackendError if any(isinstance(e, BackendError) for e in failed) else UsageError
        raise error(f"{action}: {len(failed)} of {len(names)} domains failed")


@libvirt_app.command()
def enable(
    domains: Optional[list[str]] = DOMAINS_ARG,
    all_: bool = ALL_OPT,
    emulator: Optional[str] = EMULATOR_OPT,
    connect: str = CONNECT_OPT,
) -> None:
    """Make domains start through qemu-locked (from their next start on)."""
    check_lock_manager(connect)
    wrapper = check_wrapper(emulator if emulator is not None else default_wrapper())
    names = _targets(connect, domains, all_)
    from qemu_locked.model import config as _config

    _say(apparmor.install(_config.load(), wrapper))

    def step(name: str) -> None:
        xml = dumpxml(connect, name)
        new = enable_xml(xml, name, wrapper)
        if new is None:
            sys.stdout.write(f"{name}: already under qemu-locked\n")
            return
        define(connect, new)
        sys.stdout.write(
            f"{name}: enabled ({wrapper}, execs {recorded_emulator(new.decode())})"
            f"{_when(connect, name)}\n"
        )

    _each(names, "enable", step)


@libvirt_app.command()
def disable(
    domains: Optional[list[str]] = DOMAINS_ARG,
    all_: bool = ALL_OPT,
    connect: str = CONNECT_OPT,
) -> None:
    """Restore domains' original emulator (their XML as it was before enable)."""
    names = _targets(connect, domains, all_)

    def step(name: str) -> None:
        xml = dumpxml(connect, name)
        new = disable_xml(xml, name)
        if new is None:
            sys.stdout.write(f"{name}: not under qemu-locked\n")
            return
        define(connect, new)
        sys.stdout.write(f"{name}: disabled{_when(connect, name)}\n")

    _each(names, "disable", step)
    if all_:
        _say(apparmor.uninstall())


def _say(done: str | None) -> None:
    if done:
        sys.stdout.write(done + "\n")
