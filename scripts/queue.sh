#!/usr/bin/env bash
# Train a list of published-recipe runs one after another on one core, each resumable.
#
#   scripts/queue.sh WORKTREE LIST [RUNS_DIR]
#
# WORKTREE  a checkout to run train.py from; a `git worktree` of a fixed commit keeps the
#           code fixed while the main tree is edited (docs/experiments.md).
# LIST      one run a line: its name, then Hydra overrides, e.g.
#               lit_z40_gaussian_byte255_seed2 prior=gaussian seed=2
#           Blank lines and lines starting with # are skipped.
# RUNS_DIR  where the run dirs live (default: ../runs beside WORKTREE).
#
# Each line runs
#   python train.py experiment=literature vae.latent_dim=40 logger=none hydra.mode=RUN \
#       hydra.run.dir=RUNS_DIR/NAME OVERRIDES...
# with one thread, the run dir written relative to WORKTREE (../runs/NAME). A run whose dir
# holds log_px_test.npy (its end-of-run evaluation) is skipped; any other continues from its
# last.pt (experiment=literature sets trainer.resume=true), so calling the script again after
# a stop picks up where it was.
# A run that fails is reported and the queue goes on to the next. The list is read once, at the
# start: edit it while the queue runs and the queue still trains what it held then.
set -u

if [ $# -lt 2 ]; then
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
worktree=$(cd "$1" 2>/dev/null && pwd) || { echo "no such worktree: $1" >&2; exit 2; }
list=$(cd "$(dirname "$2")" 2>/dev/null && pwd)/$(basename "$2")
[ -f "$list" ] || { echo "no such list: $2" >&2; exit 2; }
runs=${3:-$worktree/../runs}
mkdir -p "$runs"
runs=$(cd "$runs" && pwd)
python=${PYTHON:-$worktree/.venv/bin/python}
[ -x "$python" ] || python=python3

# The whole list is read now: a line edited out while the queue runs (a finished run leaves its
# list) must not shift what is read next. Bash reads a file in a loop at a byte offset.
mapfile -t lines < "$list"
for line in "${lines[@]}"; do
    read -r name overrides <<< "$line"
    case "$name" in ''|'#'*) continue ;; esac
    dir="$runs/$name"
    # Relative to the worktree where it can be (../runs/NAME): the run's Hydra record then holds no machine's path.
    rel=$(realpath -m --relative-to="$worktree" "$dir")
    if [ -f "$dir/log_px_test.npy" ]; then
        echo "$(date -u +%FT%TZ) $name: evaluated already, skipped"
        continue
    fi
    echo "$(date -u +%FT%TZ) $name: start ($overrides)"
    mkdir -p "$(dirname "$dir")"  # a name may have folders (screen/NAME): its .out goes beside its dir
    # shellcheck disable=SC2086  # the overrides are separate words on purpose
    (cd "$worktree" && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$python" train.py \
        experiment=literature vae.latent_dim=40 logger=none hydra.mode=RUN \
        "hydra.run.dir=$rel" $overrides) < /dev/null >> "$dir.out" 2>&1
    status=$?  # before anything else runs: "$(date) $?" would report date's
    echo "$(date -u +%FT%TZ) $name: exit $status"
done
