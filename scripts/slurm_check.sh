#!/usr/bin/env bash
# SLURM for real, on one machine: a private one-node SLURM cluster (Debian's slurmctld and slurmd on this host, munge
# for authentication; everything, configuration, state, logs and munge's key and socket, in one scratch folder),
# then the README's batch script with 2 tasks of 1 CPU each:
#
#     #SBATCH --nodes 1 --ntasks 2 --cpus-per-task 1
#     srun --kill-on-bad-exit=1 python -m danlu train ... --out RUN
#
# The 2 SLURM tasks must train exactly what `danlu train --procs 2` trains (float64: max weight difference < 1e-12).
# Not part of `make test`: it needs root (the daemons, and apt-get where the packages are missing).
#
#   scripts/slurm_check.sh [WORK_DIR]      # default: a new temporary folder, removed at the end unless KEEP=1
#
# Exit code 0 when the two agree; the last line is the figure (or what failed, with the daemon's own words).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || { echo "slurm_check: no $PY (run make install first, or set PYTHON)"; exit 1; }
[ "$(id -u)" = 0 ] || { echo "slurm_check: needs root (slurmd starts the job's tasks; apt-get)"; exit 1; }
WORK=${1:-$(mktemp -d -t danlu-slurm.XXXXXX)}
mkdir -p "$WORK"/{munge,state,spool,log,runs}
WORK=$(cd "$WORK" && pwd)
HOST=$(hostname -s)

fail() { echo "slurm_check: $*"; exit 1; }
stop_daemons() {  # each daemon by the pid it wrote, never by name; then wait (at most 10 s each) until it is gone
  local pids=() pid
  for pidfile in "$WORK"/slurmd.pid "$WORK"/slurmctld.pid "$WORK"/munge/munged.pid; do
    [ -s "$pidfile" ] && pid=$(cat "$pidfile") && kill "$pid" 2>/dev/null && pids+=("$pid")
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}
cleanup() { stop_daemons; [ "${KEEP:-0}" = 1 ] || [ -n "${1:-}" ] || rm -rf "$WORK"; }
trap 'cleanup' EXIT

# 1. the packages (Debian: slurmctld, slurmd, slurm-client, munge)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  echo "slurm_check: installing slurmctld slurmd slurm-client munge (apt-get)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge) \
    >"$WORK/log/apt.log" 2>&1 || fail "apt-get install failed: $(tail -1 "$WORK/log/apt.log")"
fi

# 2. munge, on a private socket with a fresh key (munged refuses to run as root without --force)
dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none && chmod 400 "$WORK/munge/munge.key"
munged --force --socket="$WORK/munge/munge.socket" --key-file="$WORK/munge/munge.key" \
  --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/log/munged.log" --seed-file="$WORK/munge/seed" \
  || fail "munged did not start: $(tail -1 "$WORK/log/munged.log" 2>/dev/null)"
echo hi | munge --socket="$WORK/munge/munge.socket" | unmunge --socket="$WORK/munge/munge.socket" >/dev/null \
  || fail "munge cannot encode and decode a credential on its own socket"

# 3. slurm.conf: one node (this host, 2 CPUs), no cgroups (process tracking by the process tree, no task plugin),
#    no accounting; ports found free just before each start, and found again if a daemon could not bind them
CPUS=$(nproc)
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
write_conf() {
  cat >"$WORK/slurm.conf" <<EOF
ClusterName=danlu
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$1
SlurmdPort=$2
AuthType=auth/munge
AuthInfo=socket=$WORK/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=60
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=check Nodes=$HOST Default=YES MaxTime=30 State=UP
EOF
}
export SLURM_CONF=$WORK/slurm.conf
up=0
for attempt in 1 2 3; do
  write_conf "$(free_port)" "$(free_port)"
  slurmctld -f "$SLURM_CONF" && slurmd -f "$SLURM_CONF" || { stop_daemons; continue; }
  for _ in $(seq 60); do  # the node registers within seconds
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1)
    [ "$state" = idle ] && { up=1; break; }
    sleep 1
  done
  [ $up = 1 ] && break
  grep -q "Address already in use" "$WORK"/log/*.log 2>/dev/null || break  # not a port collision: no retry
  stop_daemons
done
if [ $up != 1 ]; then
  echo "--- slurmctld.log"; tail -5 "$WORK/log/slurmctld.log" 2>/dev/null
  echo "--- slurmd.log"; tail -5 "$WORK/log/slurmd.log" 2>/dev/null
  cleanup keep
  fail "the SLURM node did not come up (sinfo: '${state:-nothing}'); logs kept in $WORK/log"
fi
echo "slurm_check: SLURM $(sinfo -V | cut -d' ' -f2) up: node $HOST, $CPUS CPUs ($WORK)"

# 4. the README's batch script, 2 tasks of 1 CPU, and the same run with --procs 2
TRAIN=(--device cpu --set model.name=lenet --set data.name=synthetic --set data.train_size=512
       --set data.test_size=128 --set data.batch_size=32 --set augment=none --set run.max_iter=30
       --set run.display=10 --set run.snapshot_every=0 --set run.test_interval=100000 --set run.tensorboard=false
       --set precision=fp64 --set run.seed=3)
cat >"$WORK/train.sbatch" <<EOF
#!/bin/bash
#SBATCH --nodes 1 --ntasks 2 --cpus-per-task 1 --time 10 --output $WORK/log/job-%j.out
srun --kill-on-bad-exit=1 $PY -m danlu train --out $WORK/runs/slurm ${TRAIN[*]}
EOF
job=$(sbatch --parsable --chdir "$ROOT" "$WORK/train.sbatch") || fail "sbatch refused the script"
echo "slurm_check: submitted job $job (2 tasks x 1 CPU)"
for _ in $(seq 600); do  # at most 10 minutes
  squeue -h -j "$job" 2>/dev/null | grep -q . || break
  sleep 1
done
out=$WORK/log/job-$job.out
[ -f "$WORK/runs/slurm/model.safetensors" ] || { tail -n 15 "$out"; cleanup keep; fail "the SLURM job left no model.safetensors (its output above; logs in $WORK/log)"; }
OMP_NUM_THREADS=1 "$PY" -m danlu train --procs 2 --out "$WORK/runs/procs" "${TRAIN[@]}" >"$WORK/log/procs.out" 2>&1 \
  || { tail -n 5 "$WORK/log/procs.out"; fail "danlu train --procs 2 failed"; }
"$PY" - "$WORK/runs/slurm" "$WORK/runs/procs" "$out" <<'PY'
import json, sys
from safetensors.torch import load_file
slurm, procs, out = sys.argv[1:]
a, b = load_file(f"{slurm}/model.safetensors"), load_file(f"{procs}/model.safetensors")
diff = max((a[k] - b[k]).abs().max().item() for k in a)
s = json.load(open(f"{slurm}/summary.json"))
said = open(out).read()
ok = diff < 1e-12 and s["world_size"] == 2 and s["global_batch"] == 64 and s["iterations"] == 30
print(f"SLURM job (2 tasks x 1 CPU, world_size {s['world_size']}, global batch {s['global_batch']}, "
      f"{s['iterations']} iterations) vs danlu train --procs 2, float64: max weight difference {diff:.1e} "
      f"(want < 1e-12): {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
