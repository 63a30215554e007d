# Two commands do all the set-up on a fresh machine:
#   make demo   - install, then predict the bundled example scan
#   make test   - install, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned to the CPU build that lies on local disk here; a range would
# pull a multi-GB CUDA build. nvidia-pytriton pins numpy<2: one resolver run.
TORCH := torch==2.13.0

.PHONY: install demo test test-fast lint docs format bundles clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) -e '.[export,server,dicom,eval,dev,docs,nnunet]'
	# nnunet extra: torchvision (timm's dependency, unused) is a CUDA build that
	# breaks against the CPU torch on import; remove it.
	$(BIN)/python -m pip uninstall --quiet --yes torchvision
	touch $(STAMP)

demo: install
	$(BIN)/uqserve predict examples/example.nii.gz -o uqserve-out --overwrite --png

# Tests run in JOBS pytest-xdist workers, a test file per worker at a time (module
# fixtures are built once), one OpenMP/torch thread each: threads that spin across
# workers made the suite slower, not faster. `make test JOBS=1` runs serially.
JOBS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow and not triton and not dicom"

lint: install
	$(BIN)/ruff check uqserve tests benchmarks docs/hooks.py
	$(BIN)/ruff format --check uqserve tests benchmarks docs/hooks.py
	$(BIN)/mypy uqserve
	$(BIN)/hadolint --failure-threshold info Dockerfile
	$(BIN)/kubernetes-validate --strict deploy/kubernetes/*.yaml

# The documentation site in site/ (docs/, mkdocs.yml); warnings are errors
# (not --quiet: it hides the warnings, and with them the strict check).
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

format: install
	$(BIN)/ruff format uqserve tests benchmarks
	$(BIN)/ruff check --fix uqserve tests benchmarks

# Retrain the two shipped bundles from their recipes (~15 min on 2 cores).
bundles: install
	scripts/build_bundles.sh

clean:
	rm -rf $(VENV) site build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
