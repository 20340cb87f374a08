# chatterbox-fast developer entry points. Everything installs from scratch on a fresh machine.
#   make demo   - install, build the random-weight reference checkpoint, run the engine end to end
#   make test   - install, build the reference oracle, run the test suite
PY ?= python3
VENV ?= .venv
ORACLE_DIR ?= $(HOME)/.cache/chatterbox-fast/oracle
export CHATTERBOX_FAST_ORACLE_DIR := $(ORACLE_DIR)
ORACLE_PY := $(ORACLE_DIR)/venv/bin/python
# CPU wheel of torch (lies on local disk on our machines). GPU users: see README.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv oracle test test-fast demo clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

oracle:
	bash tests/reference/setup_oracle.sh
	$(ORACLE_PY) tests/reference/build.py

test: venv oracle
	$(VENV)/bin/python -m pytest tests -q

test-fast: venv
	$(VENV)/bin/python -m pytest tests -q -m "not slow"

demo: venv oracle
	$(VENV)/bin/python examples/demo.py --ckpt-dir "$$($(PY) tests/reference/oracle_paths.py)"

clean:
	rm -rf $(VENV) build dist src/*.egg-info
