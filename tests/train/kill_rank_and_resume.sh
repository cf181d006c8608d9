#!/usr/bin/env bash
# A rank killed mid-run (SIGKILL, no chance to clean up) takes the whole `mpiexec -np 2 sdt train` job down with a
# non-zero status within 60 s, and the rerun (--resume latest) continues from the last complete state to the end.
# Then preemption: SIGUSR1 to the ranks makes them save their state at the same step and exit with 75, and the
# rerun continues from that step.
#   kill_rank_and_resume.sh SDT SOURCE_DIR
set -uo pipefail
sdt="$1"
src="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

mkdir -p "$work/train/6_toy"
cp "$src/tests/fixtures/data/images/plain.png" "$work/train/6_toy/a.png"
cp "$src/tests/fixtures/data/images/lossless.webp" "$work/train/6_toy/b.webp"
echo "a plain picture" > "$work/train/6_toy/a.txt"
echo "a lossless picture" > "$work/train/6_toy/b.txt"
args=(train --pretrained_model_name_or_path "$src/tests/fixtures/sd/sd1" --tokenizer "$src/tests/fixtures/sd/sampling/tokenizer"
      --train_data_dir "$work/train" --resolution 32 --enable_bucket --min_bucket_reso 16 --max_bucket_reso 64
      --bucket_reso_steps 8 --network_module networks.lora --network_dim 4 --network_train_unet_only
      --output_dir "$work/out" --output_name toy --max_train_steps 40 --save_every_n_steps 2 --save_state --seed 1
      --max_data_loader_n_workers 1 --resume latest)

mpiexec -np 2 "$sdt" "${args[@]}" > "$work/first.log" 2>&1 &
job=$!
for _ in $(seq 1200); do
  [ -f "$work/out/toy-step00000004-state/train_state.json" ] && break
  kill -0 "$job" 2>/dev/null || break
  sleep 0.1
done
[ -f "$work/out/toy-step00000004-state/train_state.json" ] || { echo "FAIL: no state"; tail -20 "$work/first.log"; exit 1; }
victim=""
for pid in $(pgrep -f "$sdt train"); do
  if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx 'OMPI_COMM_WORLD_RANK=1'; then victim="$pid"; fi
done
[ -n "$victim" ] || { echo "FAIL: rank 1 not found"; exit 1; }
killed_at=$(date +%s)
kill -9 "$victim"
wait "$job"
status=$?
elapsed=$(( $(date +%s) - killed_at ))
echo "rank 1 (pid $victim) killed; the job exited with status $status after ${elapsed} s"
[ "$status" -ne 0 ] || { echo "FAIL: the job exited with 0"; exit 1; }
[ "$elapsed" -le 60 ] || { echo "FAIL: the job took ${elapsed} s to end"; exit 1; }

mpiexec -np 2 "$sdt" "${args[@]}" > "$work/second.log" 2>&1 || { echo "FAIL: the rerun failed"; tail -20 "$work/second.log"; exit 1; }
resumed="$(grep -o 'resumed from [^ ]* at step [0-9]*' "$work/second.log" | head -1)"
echo "rerun: ${resumed:-did not resume}"
[ -n "$resumed" ] || { echo "FAIL: the rerun did not resume"; exit 1; }
[ -f "$work/out/toy.safetensors" ] || { echo "FAIL: no final LoRA"; exit 1; }
grep -q "trained 40 steps" "$work/second.log" || { echo "FAIL: the rerun did not reach step 40"; tail -5 "$work/second.log"; exit 1; }

rm -rf "$work/out"
mpiexec -np 2 "$sdt" "${args[@]}" > "$work/third.log" 2>&1 &
job=$!
for _ in $(seq 1200); do
  [ -f "$work/out/toy-step00000002-state/train_state.json" ] && break
  kill -0 "$job" 2>/dev/null || break
  sleep 0.1
done
for pid in $(pgrep -f "$sdt train"); do
  if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -q '^OMPI_COMM_WORLD_RANK='; then kill -USR1 "$pid"; fi
done
wait "$job"
status=$?
stopped="$(grep -o 'stopped at step [0-9]*' "$work/third.log" | head -1)"
echo "SIGUSR1: the job exited with status $status (${stopped:-no stop message})"
[ "$status" -eq 75 ] || { echo "FAIL: expected status 75"; tail -20 "$work/third.log"; exit 1; }
step="${stopped##* }"
mpiexec -np 2 "$sdt" "${args[@]}" > "$work/fourth.log" 2>&1 || { echo "FAIL: the rerun after SIGUSR1 failed"; exit 1; }
grep -q "resumed from .*step$(printf '%08d' "$step")-state at step $step" "$work/fourth.log" || {
  echo "FAIL: the rerun did not resume at step $step"; grep resumed "$work/fourth.log"; exit 1; }
grep -q "trained 40 steps" "$work/fourth.log" || { echo "FAIL: the rerun after SIGUSR1 did not reach step 40"; exit 1; }
echo "ok"
