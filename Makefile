# Two commands on a fresh machine: `make demo` (the whole method offline, a few minutes on a CPU) and
# `make test` (the test suite). Both create .venv when it is missing and install the pinned packages
# into it, torch first (torch==2.13.0 is a CPU build here; a range admitting a newer one would pull
# gigabytes of CUDA wheels). On a GPU machine, install the torch build for your CUDA into .venv first.
PY := .venv/bin/python

.PHONY: help demo test gpu-check

help:  ## list the targets
	@grep -E "^[a-z-]+:.*## " Makefile | sed -E "s/:.*## /\t/"

demo: .venv/installed  ## data, a stand-in GPT-2, ShareA and LoRA on E2E, BLEU, a plot: offline, on a CPU
	$(PY) tools/demo.py

test: .venv/installed  ## the test suite (python -m pytest -q)
	$(PY) -m pytest -q

gpu-check: .venv/installed  ## on a CUDA machine: training, resume, nf4/int8, torchrun, compile, one table (~5 min)
	$(PY) tools/gpu_check.py

# the environment, made again when a requirements file changes
.venv/installed: requirements.txt requirements-dev.txt
	@echo "installing torch 2.13.0, then requirements-dev.txt, into .venv (a minute or two; once)"
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --disable-pip-version-check -r requirements-dev.txt
	touch $@
