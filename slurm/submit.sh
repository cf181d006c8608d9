#!/usr/bin/env bash
# Submits the cache pre-pass (slurm/cache.sbatch) and the training job (slurm/train.sbatch) that starts only
# once the pre-pass has succeeded. Should the pre-pass fail, Slurm cancels the training job rather than leaving
# it pending forever (--kill-on-invalid-dep=yes).
#
#   slurm/submit.sh CONFIG.toml [sdt arguments...]      both jobs get the config and the arguments
#
# Prints "cache job ID" and "training job ID", one per line. Environment (defaults in brackets):
#   SDT_NODES [1], SDT_TASKS_PER_NODE [1]  the ranks of both jobs: nodes x tasks per node
#   SDT_SBATCH_ARGS [none]        more sbatch options for both jobs, split at spaces ("--partition big --cpus-per-task 8")
#   SDT_TRAIN_SBATCH_ARGS [none]  sbatch options for the training job only ("--time 2-00:00:00 --signal USR1@600")
#   SDT_CACHE [1]                 0: no pre-pass, the training job is submitted alone
#   SDT [build/sdt beside this folder, if built]  the sdt binary; SDT_COMMAND, SDT_CACHE_STEPS and SDT_CACHE_ARGS
#                                 are read by the job scripts (their headers say how)
# sbatch's own input variables (SBATCH_PARTITION, SBATCH_TIMELIMIT, SBATCH_ACCOUNT ...) apply to both jobs as well.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="${1:?usage: slurm/submit.sh CONFIG.toml [sdt arguments...]}"
shift
if [ -z "${SDT:-}" ] && [ -x "$here/../build/sdt" ]; then export SDT="$here/../build/sdt"; fi

read -ra common <<<"${SDT_SBATCH_ARGS:-}"
common+=(--parsable --nodes "${SDT_NODES:-1}" --ntasks-per-node "${SDT_TASKS_PER_NODE:-1}")
read -ra train_only <<<"${SDT_TRAIN_SBATCH_ARGS:-}"

after=()
if [ "${SDT_CACHE:-1}" != 0 ]; then
  # --parsable prints "ID" or "ID;CLUSTER".
  cache_job="$(sbatch "${common[@]}" "$here/cache.sbatch" "$config" "$@" | cut -d';' -f1)"
  echo "cache job $cache_job"
  after=(--dependency "afterok:$cache_job" --kill-on-invalid-dep yes)
fi
train_job="$(sbatch "${common[@]}" "${after[@]}" "${train_only[@]}" "$here/train.sbatch" "$config" "$@" | cut -d';' -f1)"
echo "training job $train_job"
