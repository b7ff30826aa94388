# `make test` and `make demo` work on a fresh machine: they create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# pip reads PIP_CONSTRAINT (old pip) or PIP_BUILD_CONSTRAINT (new pip) for chainer's
# sdist build; both point at the same pins so torch is never upgraded either.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_BUILD_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test demo clean

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

demo: install
	DEEPPOSE=$(VENV)/bin/deeppose bash examples/demo.sh

clean:
	rm -rf $(VENV) build *.egg-info
