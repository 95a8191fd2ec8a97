"""Session fixtures of the e2e suite: the lab (packages, daemons, qemu-locked for
libvirt-qemu, an images directory) and a per-test ``lab`` that removes its domains.

Under CI=true the lab must come up: a reason to skip becomes a failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from e2e import lab as _lab
from e2e.aalab import image as _aalab_image
from e2e.lab11.harness import Lab, LabError
from e2e.lab11.hosts import TwoHosts

T = TypeVar("T")


def lab11_up(what: str, start: Callable[[], T], stop: Callable[[], object]) -> T:
    """A lab11 lab (or pair of hosts) started, or the test skipped with the reason;
    under CI=true a reason to skip is a failure."""
    why = None if os.geteuid() == 0 else "needs root"
    if why is None:
        try:
            return start()
        except (LabError, RuntimeError, OSError) as exc:
            stop()
            why = f"{what}: {exc}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"under CI=true the {what} must run: {why}")
    pytest.skip(why)


# Package scope: libvirtd is stopped as soon as the e2e tests are done, not at the
# end of the whole pytest session.
@pytest.fixture(scope="package")
def lab_env() -> Iterator[tuple[_lab.Daemons, Path]]:
    try:
        daemons, images = _lab.setup()
    except _lab.LabUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"e2e lab unavailable under CI=true: {exc}")
        _lab.log(f"skipping the libvirt suite: {exc}")
        pytest.skip(f"libvirt e2e lab unavailable: {exc}")
    try:
        yield daemons, images
    finally:
        _lab.shutdown(daemons, images)


@pytest.fixture
def lab(lab_env: tuple[_lab.Daemons, Path]) -> Iterator[_lab.Lab]:
    daemons, images = lab_env
    the_lab = _lab.Lab(daemons, images)
    try:
        yield the_lab
    finally:
        the_lab.cleanup()


@pytest.fixture(scope="session")
def aalab_paths() -> _aalab_image.Paths:
    """The AppArmor lab's cached Debian 12 image (tests/e2e/aalab), built on first use."""
    return _aalab_image.for_tests()


@pytest.fixture(scope="session")
def deb_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb `make deb` builds from this tree, built once per session (the package
    test installs it on this host, the AppArmor lab in its VM)."""
    import shutil
    import subprocess

    subprocess.run(["make", "-C", str(_lab.REPO), "deb"], check=True, capture_output=True,
                   timeout=900)  # fmt: skip
    (built,) = _lab.REPO.glob("qemu-locked_*_all.deb")
    kept = tmp_path_factory.mktemp("deb") / built.name
    shutil.move(built, kept)
    shutil.rmtree(_lab.REPO / "build" / "deb", ignore_errors=True)
    return kept


# -- the two-host lab (lab11/hosts.py): a pair per test module, reset after each test


def _pair(work: Path, lockd: bool) -> Iterator[TwoHosts]:
    pair = TwoHosts(work, lockd=lockd)
    lab11_up("two-host lab", pair.start, pair.stop)
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture(scope="module")
def ql_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    yield from _pair(tmp_path_factory.mktemp("two-hosts"), lockd=False)


@pytest.fixture(scope="module")
def lockd_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    yield from _pair(tmp_path_factory.mktemp("two-hosts-lockd"), lockd=True)


@pytest.fixture
def hosts(request: pytest.FixtureRequest, backend: str) -> Iterator[TwoHosts]:
    pair: TwoHosts = request.getfixturevalue("lockd_hosts" if backend == "lockd" else "ql_hosts")
    yield pair
    for lab in pair.hosts.values():
        for name in lab.virsh("list", "--all", "--name").stdout.split():
            lab.virsh("destroy", name, check=False)
            lab.virsh("undefine", name, "--managed-save", check=False)
    for f in pair.images.iterdir():
        f.unlink()


@pytest.fixture
def a_b(hosts: TwoHosts) -> tuple[Lab, Lab]:
    return hosts.hosts["host-a"], hosts.hosts["host-b"]
