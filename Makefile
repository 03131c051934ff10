# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: setup demo test test-all docs clean

$(BIN)/python:
	# --system-site-packages: a torch the user already has (CUDA or not) stays visible and is reused.
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "using the installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "installing torch $(TORCH_VERSION) (CPU build)"; \
		$(PIP) install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
		|| $(PIP) install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	fi
	$(PIP) install -q -e ".[dev]"
	# --no-deps: torchattacks declares torchvision, which would pull another torch over this one;
	# it never imports torchvision, and its other requirements come with the [dev] extra.
	$(PIP) install -q --no-deps "torchattacks>=3.5"
	@touch $@

setup: $(VENV)/.installed

# lipmargin picks its CPU threads from the cores no other process is busy on (lipmargin.threads);
# an explicit OMP_NUM_THREADS or --threads wins.  --overwrite: `make demo` again moves the previous
# runs/demo aside (runs/demo.old-<time>) instead of refusing.
demo: setup
	$(BIN)/lipmargin train --preset digits-cll --out runs/demo --overwrite
	@echo "run the CLI as $(BIN)/lipmargin, or after: source $(BIN)/activate"

# The tests are many tiny computations: one thread each (also in the processes they start).
test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -m "not slow" -rs $(PYTEST_ARGS)

test-all: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -rs $(PYTEST_ARGS)

docs: setup
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs build site *.egg-info src/*.egg-info
