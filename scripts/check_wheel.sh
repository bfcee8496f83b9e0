#!/usr/bin/env bash
# The wheel works outside the repository: build it with `pip wheel .`, install it with its dependencies into a fresh
# virtual environment in a temporary folder (the CPU torch wheel first, as `make install` does, so the torch
# requirement never pulls a CUDA build), then train 2 steps and evaluate the checkpoint from an empty directory.
# Nothing of the checkout is importable there: the configs must come from the installed package.
#   bash scripts/check_wheel.sh        (make wheel-check; CI runs it after the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hybridlm-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
step() { echo "wheel-check [$((SECONDS - start))s] $*"; }

step "fresh virtual environment in $WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
PY=$WORK/venv/bin/python
# --no-compile: byte-compiling torch and transformers at install is most of the install time; Python compiles the
# modules it imports on first use.
PIP=("$PY" -m pip install -q --no-compile)
"${PIP[@]}" torch=="$TORCH_VERSION"

step "pip wheel ."
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$REPO"
WHEEL=$(ls "$WORK"/dist/hybridlm-*.whl)
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert "hybridlm/conf/train.yaml" in names and "hybridlm/conf/model/attention/swa.yaml" in names, "configs missing"
assert "hybridlm/kernels/ssd/__init__.py" in names, "kernels missing"
assert not [n for n in names if n.startswith(("kernels/", "conf/", "tests/"))], "top-level folders in the wheel"
print(f"{len(names)} files, {sum(n.endswith('.yaml') for n in names)} YAML configs")
EOF

step "pip install the wheel (its dependencies; torch is already there)"
"${PIP[@]}" "$WHEEL"

mkdir "$WORK/run"
cd "$WORK/run"
run() { env -u PYTHONPATH WANDB_MODE=offline OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$PY" "$@"; }
run -c "import hybridlm, sys; assert hybridlm.__file__.startswith(sys.prefix), hybridlm.__file__"

step "2-step training from an empty directory"
run -m hybridlm.train trainer.max_steps=2 trainer.val_check_interval=2 trainer.limit_val_batches=2 \
    hydra.run.dir=train
test -f train/checkpoints/last.ckpt

step "evaluation of its checkpoint"
run -m hybridlm.evaluate ckpt_path=train/checkpoints/last.ckpt trainer.limit_val_batches=2 eval=default \
    hydra.run.dir=eval
grep -q '"val/loss"' eval/result.json  # the job's record: it ran and measured
step "ok"
