# itr-pipeline: `make demo` runs the whole pipeline on the synthetic set; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
WORKDIR ?= work/demo

.PHONY: demo test test-fast bench lint clean install browser notebooks

install: $(STAMP)

# (Re)install when pyproject.toml changes. pip only: uv/poetry would download several GB of torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/itr run jobs/configs/demo.yaml workdir=$(WORKDIR)

test: $(STAMP) browser
	$(PY) -m pytest -q -ra --durations=15

# The browser tests drive Debian's headless chromium (packages chromium + chromium-driver): installed here when
# missing and possible (root with apt-get); without it they skip, and with CI=true they fail.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	      >/dev/null) || echo "make: chromium could not be installed: the browser tests skip (fail with CI=true)"; \
	  else echo "make: no chromium (apt-get install chromium chromium-driver): the browser tests skip"; fi; \
	fi

# Re-executes the notebooks on the demo's tracking store (run `make demo` first) and writes their outputs back.
notebooks: $(STAMP)
	$(PY) notebooks/run.py --workdir $(WORKDIR)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests jobs benchmarks

clean:
	rm -rf work .pytest_cache
