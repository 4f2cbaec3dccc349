# The two set-up commands of the README: `make demo` and `make test`.
# Each creates (or reuses) .venv and installs what it needs; nothing is installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo

.PHONY: demo test install check layers proto clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch comes in first and pinned: an unpinned resolve on these machines pulls a CUDA build of several GB.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,serve,client,dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -q

demo: $(STAMP)
	scripts/demo.sh $(DEMO_DIR)

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. $$(cd proto && find . -name '*.proto' | sed 's|^\./||' | sort)

check: layers
	$(BIN)/ruff format --diff vaeserve training export server client tests bench
	$(BIN)/ruff check vaeserve training export server client tests bench

# The layer rule (pyproject's [tool.importlinter]) on the built wheel: the package-dir mapping
# hides the parts from a walk of the source tree, so lint the installed layout instead.
layers: $(STAMP)
	rm -rf build  # setuptools reuses build/lib: a deleted module would still ship
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w build/layers .
	$(BIN)/python -m zipfile -e build/layers/vaeserve-*.whl build/layers/site
	cd build/layers/site && PYTHONPATH=. $(CURDIR)/$(BIN)/lint-imports $(CURDIR)/pyproject.toml --no-cache

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build
