# One command each on a fresh machine: `make demo`, `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.foldtune-installed
CONFIG ?= configs/demo.yaml
CORES  ?= 2

.PHONY: install test demo bench bench-gpu lint clean

install: $(STAMP)

# Reinstalls only when the dependency list or the pins change; the editable install picks up code changes.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-compile -c constraints.txt -e ".[dev]"
	@# Byte-compile on every core instead of pip's one (~20 s less on 2 cores); a file that does not compile
	@# (a package's template, say) is only skipped, as pip skips it.
	-$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n $(CORES) tests

# RETRAIN_BASE=1: train the demo's base model again (its recipe: configs/demo.yaml base_training) instead of
# starting from the shipped one (data/samples/demo_base).
demo: install
	$(PY) -m pipeline.demo --config $(CONFIG) --cores $(CORES) $(if $(RETRAIN_BASE),-- --config retrain_base=True)

bench: install
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,bench]"
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

# On a CUDA machine: ESMFold v1 steps vs the memory plan, predict throughput, adapter ratios -> docs/gpu_check.md
# (GPU_ARGS=--tiny: the same on tiny CPU shapes).
bench-gpu: install
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,bench]"
	$(PY) benchmarks/gpu_check.py $(GPU_ARGS)

lint: install
	$(VENV)/bin/snakemake -s snakemake/Snakefile --configfile $(CONFIG) --lint

clean:
	rm -rf results .snakemake .pytest_cache
