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

# The test venv also gets the `watermark` extra (resemble-perth), so the watermark tests run for real;
# scripts/install_test_extras.sh installs `.[test,watermark]` and works around the CUDA-only torchaudio wheel.
$(VENV)/.installed: pyproject.toml scripts/install_test_extras.sh
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	bash scripts/install_test_extras.sh $(VENV)
	touch $@

venv: $(VENV)/.installed

oracle:
	bash tests/reference/setup_oracle.sh
	$(ORACLE_PY) tests/reference/build.py

test: venv oracle
	$(VENV)/bin/python -m pytest tests -q

test-fast: venv
	$(VENV)/bin/python -m pytest tests -q -m "not slow"

# Random-weight checkpoint: the wav is noise, not speech (no hub access on our machines). Without --no-watermark the
# Perth watermark is applied (the `watermark` extra, installed in the venv by scripts/install_test_extras.sh).
demo: venv oracle
	$(VENV)/bin/chatterbox-fast speak "Hello from chatterbox-fast. This checkpoint has random weights." \
		-o out/demo.wav --ckpt-dir "$$($(PY) tests/reference/oracle_paths.py)" --device cpu \
		--no-watermark --seed 0 --max-new-tokens 100 --verbose

clean:
	rm -rf $(VENV) build dist src/*.egg-info
