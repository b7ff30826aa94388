# `make test` and `make demo` work on a fresh machine: they create .venv when it is missing.
# Another interpreter: make install VENV=.venv312 PYTHON=python3.12 (then test, demo, smoke).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# pip reads PIP_CONSTRAINT (old pip) or PIP_BUILD_CONSTRAINT (new pip) for chainer's
# sdist build; both point at the same pins so torch is never upgraded either.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_BUILD_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test test-fast demo smoke clean

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Only one OpenCV wheel may be installed: the contrib one (it has HOGDescriptor) replaces the main one.
	$(PY) -m pip uninstall -y -q opencv-python-headless opencv-python 2>/dev/null || true
	$(PY) -m pip install -e '.[test,export,distributed]'
	touch $@

install: $(VENV)/.installed

# Everything (what CI runs).
test: install
	$(PY) -m pytest -q

# Everything but the tests marked slow (those that train networks for more than ~10 s).
test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	DEEPPOSE=$(VENV)/bin/deeppose bash examples/demo.sh

# A minute-long end-to-end check of the installed CLI (both frameworks), e.g. on another Python.
smoke: install
	DEEPPOSE=$(VENV)/bin/deeppose bash examples/smoke.sh

clean:
	rm -rf $(VENV) build *.egg-info
