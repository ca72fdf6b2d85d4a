# lightning-vrn: `make demo` and `make test` set everything up on a fresh machine (CPU, Python 3.11).
PYTHON_BASE ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
DEMO        := demo
DEMO_GRID   := 100,96,96

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# Open3D's wheel links libusb; install it from Debian when the loader cannot find it.
$(STAMP): setup.cfg pyproject.toml
	@if ! ldconfig -p | grep -q libusb-1.0.so.0; then \
	  echo "installing libusb-1.0-0 (needed by Open3D)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq libusb-1.0-0 >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libusb-1.0-0; } || \
	  { echo "could not install libusb-1.0-0: run 'apt-get install libusb-1.0-0' as root"; exit 1; }; \
	fi
	$(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # pinned: an unpinned torch pulls GBs of CUDA wheels
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps facenet-pytorch==2.5.3   # face detector weights; see lightning_vrn/faces/detector.py
	touch $(STAMP)

# Synthetic data -> quickstart training -> evaluation (mesh, picture, metrics), CPU only.
demo: setup
	$(PY) -m data_prep.synthetic --out $(DEMO)/data --grid $(DEMO_GRID) \
	  --split train=1200 --split val=64 --split test=100 --workers 2
	$(PY) -m experiments.train --config experiments/configs/quickstart.yaml \
	  run_dir=$(DEMO)/run data.dir=$(DEMO)/data
	$(PY) -m experiments.evaluate --checkpoint $(DEMO)/run/checkpoints/last.ckpt \
	  --data $(DEMO)/data/test.h5 --train-data $(DEMO)/data/train.h5 --out $(DEMO)/eval

# The whole suite but GPU tests; pytest's exit code 5 (no tests collected) fails the target.
test: setup
	$(PY) -m pytest -m "not gpu" -q

test-fast: setup
	$(PY) -m pytest -m "not gpu and not slow" -q

bench: setup
	$(PY) -m benchmarks.data
	$(PY) -m benchmarks.evaluation

clean:
	rm -rf $(DEMO) .pytest_cache
