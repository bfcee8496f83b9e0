# One virtual environment per checkout. A GPU user who already has torch in their own environment can run
# `make install VENV=/path/to/env` (or `pip install -e ".[cuda]"` there); torch is only installed when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: install wheel-check train test test-all lint bench gpu-check repro-lengthgen repro-sespan clean

install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev,sweep]"

# The wheel outside the repository: `pip wheel .`, installed with its dependencies (CPU torch first) into a fresh
# virtual environment in a temporary folder; a 2-step training and an evaluation from an empty directory.
wheel-check:
	TORCH_VERSION=$(TORCH_VERSION) bash scripts/check_wheel.sh

train:
	$(PY) -m hybridlm.train $(ARGS)

test:
	$(PY) -m pytest -q -x --timeout=600 $(ARGS)

test-all:
	$(PY) -m pytest -q -m "" --timeout=1800 $(ARGS)

lint:
	$(PY) -m ruff check hybridlm kernels tests benchmarks

# ARGS="--quick" for a smoke run, ARGS="--sections train ops" for some sections; results -> benchmarks/results.jsonl
bench:
	$(PY) -m benchmarks.run $(ARGS)

# Every op and backend against references (fp32, bf16, fwd+bwd), a training step per backend and a throughput table,
# in at most 8 minutes on a CUDA machine; on CPU only what needs no GPU. Prints one table, writes gpu_check.json.
gpu-check:
	$(PY) -m hybridlm.gpu_check $(ARGS)

# Expansion Span (Nunez et al. 2024): pretrain at T=128, adapt at 8T with {swa,full,s2,se_attn} x {lora_plus,hylora},
# evaluate; writes results/sespan/{table.md,results.json,figure.png} (runs and logs in outputs/sespan/).
repro-sespan:
	$(PY) scripts/repro_sespan.py $(ARGS)

# The five length-generalization arms (conf/experiment/lengthgen/), 2 at a time, 1 thread each; about 20-30 min on
# 2 CPU cores. Writes results/lengthgen/{table.md,results.json,figure.png}. ARGS="--seed 1" or extra Hydra overrides.
repro-lengthgen:
	$(PY) scripts/repro_lengthgen.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
