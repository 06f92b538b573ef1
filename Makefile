# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv and install pinned versions when needed, so they work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install data demo test lint clean

$(STAMP): pyproject.toml requirements/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements/ci.txt
	$(BIN)/pip install -q --no-deps animal-mnist==0.4
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP) data

# Fashion-MNIST ships as a Debian package; needs root (CI and these machines run as root).
data:
	@test -d /usr/share/datasets/fashion-mnist || \
	  { (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
	    sudo sh -c 'apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist' >/dev/null 2>&1 || \
	    echo "warning: could not install dataset-fashion-mnist; tasks needing it will be skipped"; }

demo: install
	$(BIN)/piggyback demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
