# Every set-up step lives here: a fresh Debian 12 needs only `make demo` / `make test`.
SHELL := /bin/bash
VENV ?= .venv
# Debian's interpreter when present: the venv must be usable by the unprivileged
# libvirt-qemu user, and pyenv interpreters under /root are not (DESIGN.md section 7).
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
APT_TEST_PKGS := python3-venv qemu-system-x86 qemu-utils procps strace util-linux libvirt-daemon-system libvirt-clients tini sanlock python3-sanlock debootstrap man-db apparmor selinux-policy-dev semodule-utils rsyslog
APT_DEMO_PKGS := python3-venv
# The monitor guard's benchmark compiles its reference relay (tests/bench/relay_floor.c).
APT_BENCH_PKGS := gcc libc6-dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: lab11 lab-apparmor demo test lint typecheck unit clean apt-test apt-demo apt-deb venv stress bench e2e deb

# Install Debian packages that are missing (root only; others are told what to install).
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing: $$missing"; \
	    (apt-get install -y -q --no-install-recommends $$missing || \
	     (apt-get update -q && apt-get install -y -q --no-install-recommends $$missing)) >/tmp/qemu-locked-apt.log 2>&1 \
	      || { tail -20 /tmp/qemu-locked-apt.log; exit 1; }; \
	  else echo "please install: $$missing"; fi; \
	fi
endef

apt-demo:
	$(call apt_install,$(APT_DEMO_PKGS))

apt-test:
	$(call apt_install,$(APT_TEST_PKGS))

# The editable install is setuptools' strict mode (not the deprecated compat one):
# a static link tree in build/, so the launcher's start path imports nothing more
# (the default mode's import hook pulls in pathlib and re).  A new module needs a
# reinstall: the stamp depends on the package's directories, whose mtime changes
# when a file is added.  PYTHONWARNINGS keeps setuptools' notices out of make demo.
PKG_DIRS := $(shell find qemu_locked -type d -not -name __pycache__)
$(STAMP): pyproject.toml $(PKG_DIRS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=strict
	$(PY) -m qemu_locked.start.launcher
	touch $(STAMP)

venv: $(STAMP)

demo: apt-demo $(STAMP)
	$(PY) -m qemu_locked.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check qemu_locked tests
	$(VENV)/bin/ruff format --check qemu_locked tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

test: apt-test $(STAMP) lint typecheck unit

# A Debian 12 host with AppArmor enforcing (its own cloud kernel under QEMU TCG):
# the image is built once into /var/cache/qemu-locked-lab/aa-bookworm
# (tests/e2e/aalab); the control, then qemu-locked from this tree's .deb; root only.
lab-apparmor: apt-test apt-deb $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/e2e/test_aalab_control.py tests/e2e/test_aalab_qemu_locked.py

# libvirt 11.3 + QEMU 10.0 (Debian 13) in private namespaces; the root filesystem is
# built once into /var/cache/qemu-locked-lab (tests/e2e/lab11/rootfs.py); root only.
lab11: apt-test $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/e2e/test_libvirt11.py

# The libvirt end-to-end suite alone (also part of `unit`/`test`): a real libvirtd
# and QEMU, started and stopped by tests/e2e/lab.py; root only.
e2e: apt-test $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/e2e

# Benchmarks run from a non-editable install with the launcher's -IS flags,
# as a host would install it; they write BENCHMARKS.md (not part of make test).
BENCH_VENV := $(VENV)/bench-env
bench: apt-test $(STAMP)
	$(call apt_install,$(APT_BENCH_PKGS))
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade --force-reinstall --no-deps .
	$(BENCH_VENV)/bin/python -m pip install -q lxml portalocker typer matplotlib
	$(BENCH_VENV)/bin/python -m qemu_locked.start.launcher
	$(BENCH_VENV)/bin/python tests/bench/bench.py BENCHMARKS.md

# The full race/fault/hostile-input suite; rewrites docs/reliability.md's table.
stress: apt-test $(STAMP)
	STRESS=full $(VENV)/bin/pytest -q -p no:cacheprovider tests/stress

# The Debian package, by Debian's own tooling (dh-python, pybuild's pyproject
# plugin), from a copy of the tree as it is now (uncommitted changes included).
# Debian's PATH only: pybuild must not find another python3 (e.g. pyenv's) first.
APT_DEB_PKGS := dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-lxml python3-portalocker python3-typer
DEB_DIR := build/deb
apt-deb:
	$(call apt_install,$(APT_DEB_PKGS))

deb: apt-deb
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src
	git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C $(DEB_DIR)/src
	cd $(DEB_DIR)/src && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$$HOME" LANG=C.UTF-8 \
	  dpkg-buildpackage -us -uc -b >../build.log 2>&1 || { tail -30 ../build.log; exit 1; }
	mv $(DEB_DIR)/qemu-locked_*_all.deb .
	@ls qemu-locked_*_all.deb

clean:
	rm -rf $(VENV) build *.egg-info qemu-locked_*_all.deb
