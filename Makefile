# Every target here is a command the README gives. `make test` is what CI runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: test lint typecheck unit bench demo chaos system-deps clean deb

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "IronFleet needs Python >= 3.11, found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo,fleet]'
	@touch $@

# Tests run a real broker (mosquitto), check the unit with systemd-analyze, inject faults
# at system calls with strace, cut the power under a FUSE file system and fill or break
# real tmpfs and ext4 mounts (those need root, as CI has). Installed
# with apt-get when we are root; otherwise a clear message (tests never skip for a
# missing dependency).
system-deps:
	@missing=""; \
	{ command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; } || missing="$$missing mosquitto"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v strace >/dev/null 2>&1 || missing="$$missing strace"; \
	{ command -v fusermount >/dev/null 2>&1 && ldconfig -p | grep -q libfuse.so.2; } || missing="$$missing fuse libfuse2"; \
	{ command -v mkfs.ext4 >/dev/null 2>&1 && command -v e2fsck >/dev/null 2>&1; } || missing="$$missing e2fsprogs"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "make test needs:$$missing; run 'sudo apt-get install$$missing' (Debian/Ubuntu)" >&2; exit 1; \
	  fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) system-deps
	$(BIN)/pytest

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,demo,fleet,bench]'
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The whole chain on one machine: simulator, agent, broker (mosquitto if installed,
# else the embedded amqtt), collector; a one-minute scripted scenario and a report.
demo: $(STAMP)
	$(BIN)/python -m fleet.demo

# The long tier of the chaos suite, about an hour (docs/chaos.md).
chaos: $(STAMP) system-deps
	IRONFLEET_LONG=1 $(BIN)/pytest --timeout 3600 tests/chaos tests/agent/test_daemon.py

# The Debian package for vehicles: dist/ironfleet-agent_<version>_<arch>.deb, with the
# dependency versions installed in .venv; build it on the vehicles' distribution and
# architecture (docs/install.md). VERSION=x.y.z overrides pyproject's version.
deb: $(STAMP)
	PYTHON=$(BIN)/python packaging/build-deb.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
