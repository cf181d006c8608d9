#!/usr/bin/env bash
# The Slurm job scripts on a real one-node cluster: munge, slurmctld and slurmd from Debian's slurm-wlm, started
# here from a generated slurm.conf and stopped by PID at the end.
#   1. slurm/submit.sh: the cache pre-pass (2 ranks, srun --mpi=pmix) writes the latent and text-encoder caches,
#      then the training job it depends on writes the LoRA; both end COMPLETED.
#   2. A pre-pass that fails gets the dependent training job cancelled instead of pending forever.
#   3. Requeue: a training job sent SIGUSR1 once its first state exists saves, exits 75, requeues itself, and its
#      second run resumes from the state the first one saved and trains to the end.
#   4. A plain `scancel` of a training job ends it (CANCELLED) without the batch script requeueing it.
# Exits 77 (skipped) when Slurm or munge is not installed or the daemons do not come up.
#   slurm_end_to_end.sh SDT SOURCE_DIR
set -uo pipefail
sdt="$(realpath "$1")"
src="$(realpath "$2")"

skip() { echo "SKIPPED: $*"; exit 77; }
fail() { echo "FAIL: $*"; exit 1; }

# The daemons live in /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
[ "$(id -u)" = 0 ] || skip "slurmd runs jobs as root here, so the test needs root"
for tool in munge unmunge munged slurmctld slurmd sbatch srun scontrol scancel sinfo; do
  command -v "$tool" >/dev/null || skip "$tool is not installed (Debian packages slurm-wlm and munge; launcher/setup.sh installs them)"
done
# A caller that is itself a Slurm job must not leak its allocation into this cluster's jobs.
while read -r name; do unset "$name"; done < <(compgen -e | grep -E '^(SLURM|SBATCH|SRUN|SALLOC)_')

work="$(mktemp -d /tmp/sdt-slurm.XXXXXX)"
cd "$work" || fail "cannot enter $work"
started=$(date +%s)
daemon_pids=()
munged_pid=""
cluster_up=""

stop_cluster() {
  # A second Ctrl-C or ctest's TERM must not cut the clean-up short.
  trap '' INT TERM
  if [ -n "$cluster_up" ]; then
    # A job still running would outlive slurmd (its slurmstepd is not slurmd's child): cancel them all first.
    timeout 10 scancel --quiet --user "$(id -un)"
    for _ in $(seq 30); do
      [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  if [ ${#daemon_pids[@]} -gt 0 ]; then
    kill "${daemon_pids[@]}" 2>/dev/null
    # slurmd still trying to reach a controller that never started ignores SIGTERM.
    for _ in $(seq 20); do
      kill -0 "${daemon_pids[@]}" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL "${daemon_pids[@]}" 2>/dev/null
    wait "${daemon_pids[@]}" 2>/dev/null
  fi
  [ -n "$munged_pid" ] && kill "$munged_pid" 2>/dev/null
  echo "daemons stopped; $(($(date +%s) - started)) s in all"
  rm -rf "$work"
}
trap stop_cluster EXIT
trap 'exit 1' INT TERM

# munge: use the machine's running munged if there is one, else start it as Debian's package would.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [ -r /etc/munge/munge.key ] || skip "/etc/munge/munge.key is missing (the munge package creates it)"
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged || skip "munged does not start"
  munged_pid="$(cat /run/munge/munged.pid)"
  munge -n | unmunge >/dev/null || skip "munge does not work after starting munged"
fi

# Two free ports, away from a cluster the machine may already run on 6817/6818.
port=$((20000 + $$ % 20000))
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || (exec 3<>"/dev/tcp/127.0.0.1/$((port + 1))") 2>/dev/null; do
  port=$((port + 2))
done
host="$(hostname -s)"
mkdir -p slurm/state slurm/spool
export SLURM_CONF="$work/slurm/slurm.conf"
# cred_expire also delays a requeued job's restart (120 s by default); the scheduler intervals make the jobs start
# within a second or two of being eligible.
cat > "$SLURM_CONF" <<EOF
ClusterName=sdttest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmctldPort=$port
SlurmdPort=$((port + 1))
StateSaveLocation=$work/slurm/state
SlurmdSpoolDir=$work/slurm/spool
SlurmctldPidFile=$work/slurm/slurmctld.pid
SlurmdPidFile=$work/slurm/slurmd.pid
SlurmctldLogFile=$work/slurm/slurmctld.log
SlurmdLogFile=$work/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
slurmctld -D -f "$SLURM_CONF" > slurm/slurmctld.out 2>&1 &
daemon_pids+=($!)
slurmd -D -f "$SLURM_CONF" > slurm/slurmd.out 2>&1 &
daemon_pids+=($!)
# Client commands retry for a long while when there is no controller: each gets a time limit of its own.
node_state() { timeout 5 sinfo -h -o %t 2>/dev/null; }
deadline=$((SECONDS + 30))
until [ "$(node_state)" = idle ] || [ $SECONDS -ge $deadline ]; do sleep 0.5; done
if [ "$(node_state)" != idle ]; then
  tail -n 5 slurm/slurmctld.log slurm/slurmd.log slurm/*.out 2>/dev/null
  skip "the one-node cluster did not come up within 30 s (daemon logs above)"
fi
cluster_up=1
srun --mpi=list 2>&1 | grep -q pmix || skip "Slurm has no pmix plugin (srun --mpi=list)"
echo "cluster up on $host, ports $port/$((port + 1)), after $(($(date +%s) - started)) s"

# job_field JOB FIELD: one field of `scontrol show job` (accounting, and so sacct, is off here).
job_field() { timeout 10 scontrol show job -o "$1" | grep -oE "(^| )$2=[^ ]*" | cut -d= -f2-; }
# wait_job JOB SECONDS [RESTARTS]: until the job has ended after at least RESTARTS requeues; prints its state.
wait_job() {
  local state restarts deadline=$((SECONDS + $2))
  while [ $SECONDS -lt $deadline ]; do
    state="$(job_field "$1" JobState)"
    case "$state" in
      COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED)
        restarts="$(job_field "$1" Restarts)"
        if [ "${restarts:-0}" -ge "${3:-0}" ]; then echo "$state"; return; fi ;;
    esac
    sleep 0.5
  done
  echo "still ${state:-unknown} after $2 s"
}
show_log() { echo "--- $1"; tail -n 25 "$1"; }
# start_training DIR: submits train.sbatch (2 ranks, 40 steps, output in DIR) and returns once the run has saved
# its first state; sets job and log.
start_training() {
  job="$(sbatch --parsable --ntasks-per-node 2 --output "$work/%x-%j.out" "$src/slurm/train.sbatch" train.toml \
           --output_dir "$work/$1" --max_train_steps 40 | cut -d';' -f1)" || fail "sbatch: $job"
  log="sdt-train-$job.out"
  for _ in $(seq 600); do
    compgen -G "$1/toy-step*-state" >/dev/null && return
    sleep 0.1
  done
  show_log "$log"
  fail "job $job saved no state within 60 s"
}

# A dataset of two images, six repeats, and kohya's config for a tiny SD1 LoRA.
mkdir -p data/6_toy
cp "$src/tests/fixtures/data/images/plain.png" data/6_toy/a.png
cp "$src/tests/fixtures/data/images/lossless.webp" data/6_toy/b.webp
echo "toy, a plain picture" > data/6_toy/a.txt
echo "toy, a lossless picture" > data/6_toy/b.txt
cat > train.toml <<EOF
pretrained_model_name_or_path = "$src/tests/fixtures/sd/sd1"
tokenizer = "$src/tests/fixtures/sd/sampling/tokenizer"
train_data_dir = "$work/data"
caption_extension = ".txt"
resolution = "32"
enable_bucket = true
min_bucket_reso = 16
max_bucket_reso = 64
bucket_reso_steps = 8
network_module = "networks.lora"
network_dim = 4
network_train_unet_only = true
cache_latents_to_disk = true
cache_text_encoder_outputs_to_disk = true
output_name = "toy"
save_every_n_steps = 2
save_state = true
seed = 1
max_data_loader_n_workers = 1
EOF
export SDT="$sdt" SDT_TASKS_PER_NODE=2 SDT_SBATCH_ARGS="--output $work/%x-%j.out"

echo "== 1. cache pre-pass, then the training job that depends on it"
submitted="$(bash "$src/slurm/submit.sh" train.toml --output_dir "$work/out" --max_train_steps 4)" || fail "submit.sh: $submitted"
cache_job="$(awk '/^cache job/ {print $3}' <<<"$submitted")"
train_job="$(awk '/^training job/ {print $3}' <<<"$submitted")"
[ -n "$cache_job" ] && [ -n "$train_job" ] || fail "submit.sh printed: $submitted"
cache_state="$(wait_job "$cache_job" 60)"
train_state="$(wait_job "$train_job" 60)"
echo "cache job $cache_job: $cache_state; training job $train_job: $train_state"
[ "$cache_state" = COMPLETED ] || { show_log "sdt-cache-$cache_job.out"; fail "the cache job is $cache_state"; }
[ "$train_state" = COMPLETED ] || { show_log "sdt-train-$train_job.out"; fail "the training job is $train_state"; }
for kind in latents text_encoder_outputs; do
  for rank in 0000 0001; do
    ls data/sdt_cache/$kind.r$rank-of-0002.*.h5 >/dev/null 2>&1 || { ls -l data/sdt_cache; fail "no $kind cache part of rank $rank"; }
  done
done
[[ ! "$(job_field "$train_job" StartTime)" < "$(job_field "$cache_job" EndTime)" ]] ||
  fail "the training job started before the cache job ended"
grep -q "2 ranks on 1 nodes" "sdt-train-$train_job.out" || { show_log "sdt-train-$train_job.out"; fail "training did not run on 2 ranks"; }
[ -f out/toy.safetensors ] || { show_log "sdt-train-$train_job.out"; fail "no LoRA file out/toy.safetensors"; }
grep -q "were valid, 0 encoded by this rank" "$work"/*-"$train_job".out ||
  { cat "$work"/*-"$train_job".out | tail -20; fail "the training job did not train from the pre-pass's latent cache"; }
echo "ok: caches in data/sdt_cache (both ranks' parts), training read them, LoRA out/toy.safetensors"

echo "== 2. a failed pre-pass cancels the dependent training job"
submitted="$(bash "$src/slurm/submit.sh" train.toml --train_data_dir "$work/missing" --output_dir "$work/never")" ||
  fail "submit.sh: $submitted"
cache_job="$(awk '/^cache job/ {print $3}' <<<"$submitted")"
train_job="$(awk '/^training job/ {print $3}' <<<"$submitted")"
cache_state="$(wait_job "$cache_job" 60)"
train_state="$(wait_job "$train_job" 30)"
echo "cache job $cache_job: $cache_state; training job $train_job: $train_state ($(job_field "$train_job" Reason))"
[ "$cache_state" = FAILED ] || { show_log "sdt-cache-$cache_job.out"; fail "the failing cache job is $cache_state"; }
[ "$train_state" = CANCELLED ] || fail "the dependent training job is $train_state, not CANCELLED"
echo "ok"

echo "== 3. SIGUSR1 mid-run: save, exit 75, requeue, resume"
start_training usr1
scancel --signal=USR1 "$job" || fail "scancel --signal=USR1 $job"
state="$(wait_job "$job" 90 1)"
echo "job $job: $state after $(job_field "$job" Restarts) requeue(s)"
tr '\r' '\n' < "$log" | grep -E 'job [0-9]+, run|resume|asked to stop|requeue|trained'
[ "$state" = COMPLETED ] || { show_log "$log"; fail "the requeued job is $state"; }
saved="$(grep -oE 'stopped at step [0-9]+ on request; state: [^ ]+' "$log" | head -n 1 | awk '{print $4, $NF}')"
resumed="$(grep -oE 'resumed from [^ ]+ at step [0-9]+' "$log" | head -n 1 | awk '{print $NF, $3}')"
[ -n "$saved" ] || fail "the first run did not stop on SIGUSR1"
grep -q "exit 75): requeueing job $job" "$log" || fail "the batch script did not requeue the job"
grep -q "job $job, run 2:" "$log" || fail "the job did not run a second time"
[ "$resumed" = "$saved" ] || fail "the second run resumed from '${resumed:-nothing}', not from the saved state '$saved'"
[ "${saved%% *}" -gt 0 ] || fail "the saved step is not after the start"
grep -q "trained 40 steps" "$log" || fail "the resumed run did not reach step 40"
[ -f usr1/toy.safetensors ] || fail "no LoRA file usr1/toy.safetensors"
echo "ok: stopped and saved at step ${saved%% *}, requeued, resumed there, LoRA usr1/toy.safetensors"

echo "== 4. plain scancel: the ranks save, and the job ends instead of requeueing"
start_training cancel
scancel "$job" || fail "scancel $job"
state="$(wait_job "$job" 30)"
echo "job $job: $state after $(job_field "$job" Restarts) requeue(s)"
[ "$state" = CANCELLED ] || { show_log "$log"; fail "the cancelled job is $state"; }
[ "$(job_field "$job" Restarts)" = 0 ] || { show_log "$log"; fail "the cancelled job was requeued"; }
grep -q "the job was cancelled, so it is not requeued" "$log" || { show_log "$log"; fail "the batch script did not see the cancel"; }
echo "ok"
