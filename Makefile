# One virtual environment per checkout. A GPU user who already has torch in their own environment can run
# `make install VENV=/path/to/env` (or `pip install -e ".[cuda]"` there); torch is only installed when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: install wheel-check train test test-all lint bench gpu-check repro-lengthgen failure-map repro-sespan clean

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

# The default suite (not slow; CPU-fast) lists its 15 slowest tests, so a new slow one shows.
test:
	$(PY) -m pytest -q -x --timeout=600 --durations=15 $(ARGS)

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

# CPUs for the repro targets' jobs (as os.cpu_count(); nproc would follow OMP_NUM_THREADS): two jobs at a time get
# half of them each, as the joblib launcher would.
NPROC := $(shell getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
HALF_NPROC := $(shell n=$(NPROC); echo $$(( n > 1 ? n / 2 : 1 )))

# Length generalization (Buitrago Ruiz & Gu 2025; docs/results/lengthgen.md), the paper's headline on a model that
# fails: pretrain the baseline (conf/experiment/lengthgen/baseline.yaml) for seeds 0-2, then post-train each seed's
# checkpoint for 50 steps with every intervention and with none (lengthgen/repro/post_train.yaml), each job
# evaluated to 64T; two jobs at a time, 1 thread each. Then the reader builds results/lengthgen/{table.md,
# results.json,figure.png,logs/}. Runs in outputs/lengthgen/{pretrain,post_train}/.
# ARGS: Hydra overrides for every job of both stages, e.g. ARGS="seed=0" or ARGS="trainer.max_steps=10";
# POST_ARGS: for the post-training jobs only, e.g. POST_ARGS="intervention=none,state_passing".
LENGTHGEN_RUNS ?= outputs/lengthgen
LENGTHGEN_OUT ?= results/lengthgen
LENGTHGEN := $(abspath $(LENGTHGEN_RUNS))
LENGTHGEN_COMMAND = $(strip make repro-lengthgen $(foreach v,ARGS POST_ARGS,$(if $($(v)),$(v)="$($(v))")))
repro-lengthgen:
	rm -rf $(LENGTHGEN)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m hybridlm.train -m +experiment=lengthgen/repro/pretrain \
		hydra.sweep.dir=$(LENGTHGEN)/pretrain $(ARGS)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m hybridlm.train -m +experiment=lengthgen/repro/post_train \
		'init_from=$(LENGTHGEN)/pretrain/seed$${seed}/checkpoints/last.ckpt' \
		hydra.sweep.dir=$(LENGTHGEN)/post_train $(ARGS) $(POST_ARGS)
	$(PY) -m hybridlm.results lengthgen $(LENGTHGEN) --out $(LENGTHGEN_OUT) --command '$(LENGTHGEN_COMMAND)'

# The failure map (issue 13; conf/experiment/lengthgen/failure_map.yaml): one long run per setting (51.2M tokens
# each, 2 at a time, 1 thread each; about an hour per pair of runs on 2 cores), each evaluated every 2M tokens, then
# results/failure_map/{table.md,results.json,figure.png}. ARGS: Hydra overrides, e.g. a smaller grid
# ARGS="experiment/lengthgen/task=recall_fresh model.ssm.d_state=16,64 data.seq_len=32", or resume=auto to continue
# a stopped sweep in FAILURE_MAP_RUNS. Unlike the repro targets it does not delete earlier runs.
FAILURE_MAP_RUNS ?= outputs/failure_map
FAILURE_MAP_OUT ?= results/failure_map
failure-map:
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m hybridlm.train -m +experiment=lengthgen/failure_map \
		hydra.sweep.dir=$(abspath $(FAILURE_MAP_RUNS)) $(ARGS)
	$(PY) -m hybridlm.results failure_map $(FAILURE_MAP_RUNS) --out $(FAILURE_MAP_OUT) \
		--command 'make failure-map$(if $(ARGS), ARGS="$(ARGS)")'

# Expansion Span (Nunez et al. 2025), the paper's protocol (issue 12; docs/results/sespan.md): pretrain a hybrid at
# T=128 on text, fine-tune it at 8T with {full,swa,s2,se_attn} x hylora and se_attn x {lora,lora_plus}, evaluate the
# pretrained and every fine-tuned checkpoint with full attention (Table 1) and with its own (Table 2): perplexity at
# T-32T and a needle in a text haystack at 2T-8T; time a step of each kind at 8T alone. Each stage a Hydra run or
# multirun of conf/experiment/sespan/repro/, in outputs/sespan/seed<N>/<stage>/, the whole protocol once per seed of
# SEEDS (SEEDS="0 1 2": three pretrained models, each fine-tuned and evaluated; seed 0 is the configs' defaults,
# seed N > 0 adds seed=N data.seed=N to the training stages; the evaluation data is the same for every seed). Then
# the reader writes results/sespan/{table.md,results.json,figure.png}, over the seeds when there are several;
# SESPAN_PRIOR: results.json files of earlier seeds to add (e.g. SESPAN_PRIOR=results/sespan/seed0.json).
# Hydra overrides per stage: PRETRAIN_ARGS (pretrain), ADAPT_ARGS (fine-tuning and timing), EVAL_ARGS (evaluation).
SESPAN_RUNS ?= outputs/sespan
SESPAN_OUT ?= results/sespan
SEEDS ?= 0
SESPAN := $(abspath $(SESPAN_RUNS))
SESPAN_COMMAND = $(strip make repro-sespan $(if $(filter-out 0,$(SEEDS)),SEEDS="$(SEEDS)") \
	$(foreach v,SESPAN_PRIOR PRETRAIN_ARGS ADAPT_ARGS EVAL_ARGS,$(if $($(v)),$(v)="$($(v))")))
# The reader gets the seed folders of SEEDS only: runs of other seeds left in SESPAN_RUNS by an earlier call are not
# read.
repro-sespan: $(addprefix sespan-seed-,$(SEEDS))
	$(PY) -m hybridlm.results sespan $(addprefix $(SESPAN)/seed,$(SEEDS)) $(SESPAN_PRIOR) --out $(SESPAN_OUT) \
		--command '$(SESPAN_COMMAND)'

# One seed of repro-sespan, in $(SESPAN)/seed<N>/.
sespan-seed-%: export WANDB_MODE = offline
sespan-seed-%: SEED_DIR = $(SESPAN)/seed$*
sespan-seed-%: SEED_CKPT = $(SESPAN)/seed$*/pretrain/checkpoints/last.ckpt
sespan-seed-%: SEED_ARGS = $(if $(filter-out 0,$*),seed=$* data.seed=$*)
sespan-seed-%:
	rm -rf $(SEED_DIR)
	OMP_NUM_THREADS=$(NPROC) $(PY) -m hybridlm.train +experiment=sespan/repro/pretrain \
		hydra.run.dir=$(SEED_DIR)/pretrain $(SEED_ARGS) $(PRETRAIN_ARGS)
	OMP_NUM_THREADS=$(HALF_NPROC) $(PY) -m hybridlm.train -m +experiment=sespan/repro/adapt \
		init_from=$(SEED_CKPT) hydra.sweep.dir=$(SEED_DIR)/adapt $(SEED_ARGS) $(ADAPT_ARGS)
	OMP_NUM_THREADS=$(HALF_NPROC) $(PY) -m hybridlm.train -m +experiment=sespan/repro/adapt \
		model/attention=se_attn adapter=lora,lora_plus \
		init_from=$(SEED_CKPT) hydra.sweep.dir=$(SEED_DIR)/adapt_recipes $(SEED_ARGS) $(ADAPT_ARGS)
	OMP_NUM_THREADS=$(HALF_NPROC) $(PY) -m hybridlm.evaluate -m +experiment=sespan/repro/eval \
		ckpt_path=$(SEED_CKPT),$$(ls $(SEED_DIR)/adapt*/*/checkpoints/last.ckpt | paste -sd, -) \
		hydra.sweep.dir=$(SEED_DIR)/eval $(EVAL_ARGS)
	OMP_NUM_THREADS=$(HALF_NPROC) $(PY) -m hybridlm.train -m +experiment=sespan/repro/timing \
		init_from=$(SEED_CKPT) hydra.sweep.dir=$(SEED_DIR)/timing $(SEED_ARGS) $(ADAPT_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
