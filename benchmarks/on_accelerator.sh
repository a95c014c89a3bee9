#!/usr/bin/env bash
# Every device check of one short accelerator lease, in one command (about
# 8 minutes; each part has its own time limit, so one that fails or hangs
# does not cost the others). Run from the repository root on the machine
# with the accelerator; logs and results go to $OUT (default /tmp/accel_out):
#
#   env.txt          nvidia-smi and the package versions
#   suite.log        benchmarks/accelerator_suite.py (issue 18 item 6):
#                    chunk sweep, scaling to 100,000 clients, ragged
#                    cohorts, peers.py's FEMNIST workload
#   device_cost.log  benchmarks/device_cost.py (issue 15): what each
#                    technique's device program holds, compiled for the GPU
#   lm_paper.log     Ro et al.'s paper-scale Transformer (21M, 10k vocabulary,
#                    50 clients x 16 steps per round; issue 16 item 3) for
#                    as many rounds as LM_ROUNDS: seconds per round, the
#                    device cost, the perplexity so far
#   default_run.log  the `make run` experiment on the GPU
#   results.tar      every JSON written, the LM run's metrics.jsonl
#
# PARTS (comma-separated) picks what runs; default
# suite,device_cost,lm_paper,default_run. Two more parts are ready:
#   replicas         benchmarks/replicas.py with replicas as a vmap (issue
#                    22: the accelerator case, unmeasured) -> replicas.log
#   fd_speech        benchmarks/fd_schedules.py's speech arms on the 'cpu'
#                    Conformer for FD_ROUNDS (300) rounds, 1 seed (issue 15
#                    item 4 at converged scale) -> fd_speech.log. The
#                    machine has no espeak-ng: carry the built set. Here:
#                      echo /.speech_cache/ >> .git/info/exclude
#                      mkdir -p .speech_cache
#                      cp -r ~/.cache/fedjax_eff/speech/espeak-* .speech_cache/
#                    and name .speech_cache in `carry` (about 55 MB of the
#                    64 MiB a call may take).
#   caff_text        benchmarks/caff_vs_lora.py --backbone minilm (issue 15
#                    item 3's text arm: all-MiniLM-L6-v2 fine-tuned on the
#                    stdlib docstring topics) -> caff_text.log. Its 91 MB
#                    of fp32 weights exceed what a call may carry: carry a
#                    float16 copy (45 MB; loaded back as float32):
#                      echo /.minilm_f16/ >> .git/info/exclude
#                      python benchmarks/caff_vs_lora.py --write_f16 .minilm_f16
#                    and name .minilm_f16 in `carry` (not with .speech_cache).
# Each part's seconds: SUITE_S, DC_S, LM_S, DEFAULT_S, REPLICAS_S, FD_S,
# CAFF_S; extra flags: SUITE_ARGS, DC_ARGS, LM_ARGS, REPLICAS_ARGS, FD_ARGS,
# CAFF_ARGS.
#
# Python packages the accelerator image lacks travel as wheels in .whl/
# (see benchmarks/RESULTS.md, "Accelerator suite on one NVIDIA H200").
#
#   bash benchmarks/on_accelerator.sh
set -u
OUT=${OUT:-/tmp/accel_out}
mkdir -p "$OUT" /tmp/accel_res
SUITE_S=${SUITE_S:-280}
LM_ROUNDS=${LM_ROUNDS:-30}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
SUITE_ARGS=${SUITE_ARGS:-} DC_ARGS=${DC_ARGS:-} LM_ARGS=${LM_ARGS:-}
REPLICAS_ARGS=${REPLICAS_ARGS:-} FD_ARGS=${FD_ARGS:-} CAFF_ARGS=${CAFF_ARGS:-}
PARTS=${PARTS:-suite,device_cost,lm_paper,default_run}
has() { case ",$PARTS," in *",$1,"*) return 0 ;; esac; return 1; }
if [ -d .whl ] && command -v nvidia-smi > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
fi
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv 2>&1; git log -1 --format='%H %s' 2>&1; git status --short
  python3 -c 'import sys, jax, flax, optax, numpy, ml_collections
import orbax.checkpoint as o, dp_accounting
print(sys.version.split()[0], "jax", jax.__version__, "flax",
      flax.__version__, "optax", optax.__version__, "numpy",
      numpy.__version__, "orbax", o.__version__, jax.devices())
import fedjax_eff.experiment; print("fedjax_eff imports")' 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# Compile-only (XLA's memory and cost analyses, nothing executed), so it
# runs on the host's cores beside the suite; autotuning off so that it puts
# no kernels on the GPU while the suite times its rounds.
dc_pid=
if has device_cost; then
  stamp "device_cost (background)"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
    timeout -k 5 ${DC_S:-400} python3 benchmarks/device_cost.py \
    --sim_rounds 0 --out /tmp/accel_res/device_cost.json $DC_ARGS \
    > "$OUT/device_cost.log" 2>&1 &
  dc_pid=$!
fi
pack() {
  (cd /tmp/accel_res && tar cf "$OUT/results.tar" --exclude='checkpoints' \
    --exclude='*.lock' ./*.json ./*.png lm_paper/*.json* \
    default_run/*.json* 2>/dev/null)
}

if has suite; then
  stamp suite
  timeout -k 15 $((SUITE_S + 40)) python3 benchmarks/accelerator_suite.py \
    --budget_s "$SUITE_S" --sweep_share 0.25 --ragged_s 110 --peers_s 40 \
    --out /tmp/accel_res/accelerator_suite.json $SUITE_ARGS \
    > "$OUT/suite.log" 2>&1
  stamp "suite rc=$?"; tail -3 "$OUT/suite.log" | cut -c1-600; pack
fi

if has replicas; then
  stamp replicas
  timeout -k 15 ${REPLICAS_S:-150} python3 benchmarks/replicas.py \
    --replica_mode vmap --out /tmp/accel_res/replicas.json $REPLICAS_ARGS \
    > "$OUT/replicas.log" 2>&1
  stamp "replicas rc=$?"; tail -3 "$OUT/replicas.log" | cut -c1-600; pack
fi

if has fd_speech; then
  stamp fd_speech
  if [ -d .speech_cache ]; then
    mkdir -p ~/.cache/fedjax_eff/speech
    cp -r .speech_cache/* ~/.cache/fedjax_eff/speech/
  fi
  timeout -k 15 ${FD_S:-420} python3 benchmarks/fd_schedules.py \
    --tasks speech --speech_preset cpu --speech_rounds "${FD_ROUNDS:-300}" \
    --seeds 1 --no_cost_table --workdir /tmp/accel_fd \
    --out /tmp/accel_res/fd_speech $FD_ARGS > "$OUT/fd_speech.log" 2>&1
  stamp "fd_speech rc=$?"; tail -3 "$OUT/fd_speech.log" | cut -c1-600; pack
fi

if has caff_text; then
  stamp caff_text
  model_dir=
  [ -d .minilm_f16 ] && model_dir="--model_dir .minilm_f16"
  timeout -k 15 ${CAFF_S:-420} python3 benchmarks/caff_vs_lora.py \
    --backbone minilm $model_dir --workdir /tmp/accel_caff \
    --out /tmp/accel_res/caff_vs_lora_text.json $CAFF_ARGS \
    > "$OUT/caff_text.log" 2>&1
  stamp "caff_text rc=$?"; tail -3 "$OUT/caff_text.log" | cut -c1-600; pack
fi

if has lm_paper; then
  stamp lm_paper
  timeout -k 15 ${LM_S:-110} python3 launch/train.py \
    --config=configs/lm/stdlib.py:transformer_21m,fedadam,paper \
    --workdir=/tmp/accel_res/lm_paper --config.num_rounds="$LM_ROUNDS" \
    --config.eval_every=10 --config.checkpoint_every="$LM_ROUNDS" \
    --config.progress=False --config.tensorboard=False $LM_ARGS \
    > "$OUT/lm_paper.log" 2>&1
  stamp "lm_paper rc=$?"; tail -4 "$OUT/lm_paper.log" | cut -c1-600; pack
fi

if has default_run; then
  stamp default_run
  timeout -k 15 ${DEFAULT_S:-50} python3 launch/train.py \
    --config=configs/default.py --workdir=/tmp/accel_res/default_run \
    --config.progress=False --config.tensorboard=False \
    > "$OUT/default_run.log" 2>&1
  stamp "default_run rc=$?"; tail -3 "$OUT/default_run.log" | cut -c1-600
fi

if [ -n "$dc_pid" ]; then
  wait $dc_pid
  stamp "device_cost rc=$?"; tail -2 "$OUT/device_cost.log" | cut -c1-600
fi
pack
stamp "done"
