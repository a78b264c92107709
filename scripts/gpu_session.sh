#!/usr/bin/env bash
# One session on a lent GPU, in one command: the CUDA tests and the GPU surgery benchmark,
# and meanwhile the published-recipe runs side by side on the one GPU until a wall-clock
# deadline; then everything packed for the trip back. Every run resumes from its last.pt
# (trainer.resume=true in these experiments), so calling the script again continues them.
#
#   scripts/gpu_session.sh OUT SECONDS
#   scripts/gpu_session.sh bench OUT [ARGS]   # issue 28's measurements alone, on the idle GPU
#
# `bench` mode: installs the carried wheels if Hydra is missing (carry .whl; the device
# image has torch but not hydra-core/omegaconf), runs the CUDA tests (at most 90 s), then
# bench/gpu_bench.py (ARGS passed on; its --budget, 390 s), under 8 minutes in all, into
# OUT/gpu: bench.log, results.json, summary.md, profile.txt, cuda_tests.log. Nothing else
# runs beside it, so the timings are the idle GPU's. Without a GPU, `bench OUT --smoke`
# checks the script in under a minute or two (docs/gpus.md). The device call:
#
#   run(command="scripts/gpu_session.sh bench $OUT", carry=[".whl"], timeout_s=600)
#
# OUT       where the results go: runs.tgz (every run dir without checkpoints, every log)
#           and the last.pt of each run named in RETURN_CKPTS, in pieces of at most 15 MB
#           (join them with `cat NAME-last.pt.part* > last.pt`).
# SECONDS   wall-clock budget of the whole script, packing included.
#
# Environment:
# RUNS_DIR      where the run dirs live (default ../runs).
# CONTINUE_DIR  run dirs found here are copied into RUNS_DIR first (unless already there),
#               to continue runs that started on another machine. Send them every call: an
#               ignored RUNS_DIR inside the work tree did not survive between two calls on
#               the same warm device machine (2026-11-26: the second call started fresh).
# MNIST         a copy of mnist.pkl.gz, put where the data config looks by default (a priorlab
#               directory under XDG_CACHE_HOME), so that no machine's path enters a run's config.
# ONLY          run names to start (default: DEFAULT_RUNS below, the runs still going; the
#               finished ones only by name).
# RETURN_CKPTS  run names whose last.pt goes to OUT (mind the 64 MiB a device call returns).
# JOBS_FILE     one shell command a line (evaluations, post-hoc fits), each run in the background
#               beside the runs, under the same deadline; its output in RUNS_DIR/jobs/N.log.
#               Write what should come back under RUNS_DIR (checkpoints stay behind).
# TESTS         0 skips the CUDA tests and the benchmark.
# PYTHON        the interpreter (default python3).
set -u
if [ "${1:-}" = bench ]; then
  out=$2/gpu
  shift 2
  py=${PYTHON:-python3}
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
  if ! "$py" -c "import hydra, omegaconf" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  started=$(date +%s)
  nvidia-smi --query-gpu=name,memory.total,driver_version,utilization.gpu --format=csv,noheader 2>/dev/null
  if [ "${TESTS:-1}" != 0 ]; then
    timeout 90 "$py" -m pytest -m cuda -q -p no:cacheprovider tests >"$out/cuda_tests.log" 2>&1
    echo "CUDA tests: exit $? ($(($(date +%s) - started)) s)"
    tail -n 5 "$out/cuda_tests.log"
  fi
  "$py" bench/gpu_bench.py --out "$out" "$@" 2>&1 | tee "$out/bench.log"
  echo "total $(($(date +%s) - started)) s"
  exit 0
fi
out=$1
budget=$2
started=$(date +%s)
deadline=$((started + budget - 45)) # the last 45 s pack the results
runs_dir=${RUNS_DIR:-../runs}
py=${PYTHON:-python3}
mkdir -p "$out" "$runs_dir"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled

zoo="experiment=prior_zoo vae.latent_dim=40 seed=0 trainer.max_epochs=100 trainer.warmup_epochs=5"
zoo="$zoo surgery.is_samples=5000 surgery.is_points=2000"
declare -A RUNS=(
  [hj_z2]="experiment=elbo_surgery vae.latent_dim=2"
  [hj_z10]="experiment=elbo_surgery vae.latent_dim=10"
  [hj_z20_normgrad]="experiment=elbo_surgery vae.latent_dim=20"
  # The recipe on the file's grey levels (byte / 256), as run before 2026-12-03.
  [lit_z40_gaussian]="experiment=literature data=binarized_mnist prior=gaussian vae.latent_dim=40"
  [lit_z40_vampprior]="experiment=literature data=binarized_mnist prior=vampprior vae.latent_dim=40"
  [lit_z40_flow]="experiment=literature data=binarized_mnist prior=flow vae.latent_dim=40"
  [lit_z40_mixture]="experiment=literature data=binarized_mnist prior=mixture vae.latent_dim=40"
  # The recipe on the published code's grey levels (byte / 255, the experiment's default now).
  [lit_z40_gaussian_byte255]="experiment=literature prior=gaussian vae.latent_dim=40 data.byte_divisor=255"
  [lit_z40_vampprior_byte255]="experiment=literature prior=vampprior vae.latent_dim=40"
  [lit_z40_flow_byte255]="experiment=literature prior=flow vae.latent_dim=40"
  [lit_z40_mixture_byte255]="experiment=literature prior=mixture vae.latent_dim=40"
  [lit_z40_exemplar_byte255]="experiment=literature prior=exemplar vae.latent_dim=40"
  # Why the 20-D marginal KL is 53% above Hoffman & Johnson's: the recipe with ReLU networks.
  [hj_z20_mlp]="experiment=elbo_surgery vae=mlp vae.latent_dim=20"
  # ... and the recipe without its KL warm-up.
  [hj_z20_nowarmup]="experiment=elbo_surgery vae.latent_dim=20 trainer.warmup_epochs=0"
  [zoo100_exemplar]="$zoo prior=exemplar"
  [zoo100_aggregate]="$zoo prior=aggregate"
  # Why the exact aggregate prior degrades when trained (docs/priors.md): the exemplar prior
  # with its means taken detached from the epoch's cache, as the aggregate prior takes them.
  [zoo100_exemplar_all_detached]="$zoo prior=exemplar prior.exemplars=all prior.gradient=false"
  [zoo100_exemplar_knn_detached]="$zoo prior=exemplar prior.gradient=false"
)
DEFAULT_RUNS="lit_z40_exemplar_byte255 hj_z20_nowarmup"
only=${ONLY:-$DEFAULT_RUNS}

if [ -n "${CONTINUE_DIR:-}" ]; then
  for d in "$CONTINUE_DIR"/*/; do
    name=$(basename "$d")
    [ -e "$runs_dir/$name" ] || cp -r "$d" "$runs_dir/$name"
  done
fi

if [ -n "${MNIST:-}" ]; then
  XDG_CACHE_HOME=$(cd "$runs_dir" && pwd)/.cache
  export XDG_CACHE_HOME
  mkdir -p "$XDG_CACHE_HOME/priorlab" && cp -n "$MNIST" "$XDG_CACHE_HOME/priorlab/mnist.pkl.gz"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$runs_dir/gpu.txt"
jobs=()
[ -n "${JOBS_FILE:-}" ] && mapfile -t jobs < <(grep -v '^[[:space:]]*\(#\|$\)' "$JOBS_FILE")
threads=$(($(nproc) / ($(echo "$only" | wc -w) + ${#jobs[@]})))
threads=$((threads > 0 ? threads : 1))
pids=()
for name in $only; do
  left=$((deadline - $(date +%s)))
  # shellcheck disable=SC2086  # the overrides are words
  OMP_NUM_THREADS=$threads timeout --signal=TERM --kill-after=15 "$left" \
    "$py" train.py ${RUNS[$name]} logger=none trainer.progress=false \
    hydra.mode=RUN "hydra.run.dir=$runs_dir/$name" >>"$runs_dir/$name.log" 2>&1 &
  pids+=($!)
  echo "started $name (pid $!, ${left}s left, $threads threads): ${RUNS[$name]}"
done

mkdir -p "$runs_dir/jobs"
for i in "${!jobs[@]}"; do
  left=$((deadline - $(date +%s)))
  OMP_NUM_THREADS=$threads timeout --signal=TERM --kill-after=15 "$left" bash -c "${jobs[$i]}" >"$runs_dir/jobs/$i.log" 2>&1 &
  pids+=($!)
  echo "started job $i (pid $!): ${jobs[$i]}"
done

if [ "${TESTS:-1}" != 0 ]; then
  left=$((deadline - $(date +%s)))
  timeout "$left" "$py" -m pytest -m cuda -q -p no:cacheprovider tests >"$runs_dir/cuda_tests.log" 2>&1
  echo "CUDA tests: exit $?"
  tail -n 15 "$runs_dir/cuda_tests.log"
  left=$((deadline - $(date +%s)))
  timeout "$left" "$py" bench/surgery_speed.py --device cuda --is-points 200 >"$runs_dir/surgery_speed_cuda.log" 2>&1
  echo "surgery benchmark: exit $?"
  cat "$runs_dir/surgery_speed_cuda.log"
fi

while [ "$(date +%s)" -lt "$deadline" ] && kill -0 "${pids[@]}" 2>/dev/null; do
  sleep 10
  if [ $(($(date +%s) % 120)) -lt 10 ]; then nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; fi
done
wait
for i in "${!jobs[@]}"; do
  echo "== job $i: ${jobs[$i]}"
  tail -n 4 "$runs_dir/jobs/$i.log"
done
for name in $only; do
  echo "== $name: $(grep -c . "$runs_dir/$name/metrics.jsonl" 2>/dev/null) epochs"
  tail -n 3 "$runs_dir/$name.log"
done

tar czf "$out/runs.tgz" --exclude='*.pt' --exclude='.lock' --exclude='.cache' -C "$runs_dir" .
for name in ${RETURN_CKPTS:-}; do
  ckpt=$runs_dir/$name/checkpoints/last.pt
  [ -f "$ckpt" ] && split -b 15000000 -d "$ckpt" "$out/$name-last.pt.part"
done
ls -la "$out"
echo "total $(($(date +%s) - started)) s"
