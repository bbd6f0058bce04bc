# itr-pipeline: `make demo` runs the whole pipeline on the synthetic set; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
WORKDIR ?= work/demo

.PHONY: demo test test-fast bench lint clean install

install: $(STAMP)

# (Re)install when pyproject.toml changes. pip only: uv/poetry would download several GB of torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/itr run jobs/configs/demo.yaml workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests jobs benchmarks

clean:
	rm -rf work .pytest_cache
