#!/usr/bin/env bash
# Runs `python -m claver_jax.main` as N local processes of one multi-process JAX run on the CPU.
#
#   launch/local_multiprocess.sh N --config=configs/demo.py --workdir=/tmp/claver_mp [...]
#
# Each process gets 2 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=2;
# CLAVER_DEVICES_PER_PROCESS changes it) and talks to the others through gloo, with process 0's
# coordinator on 127.0.0.1 and a free port. They share the workdir: process 0 writes the metrics,
# all of them the checkpoints. Ctrl-C or SIGTERM is passed on to every process as SIGTERM, so they
# save a checkpoint after the same step and exit 0 (a second Ctrl-C kills them). If one process
# fails, the others are stopped. Exits 0 when every process exited 0, else with the first failure's
# status. PYTHON picks the interpreter (default: python on PATH). Run from the repository root, or
# anywhere claver_jax is installed and the config path resolves.
set -euo pipefail

readonly NAME=local_multiprocess
readonly GRACE_SECONDS=${CLAVER_GRACE_SECONDS:-30}   # after a failure, before SIGKILL

usage() {
  sed -n '2,13s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "$NAME: needs bash >= 5.1 (wait -n -p); this is $BASH_VERSION." >&2
  exit 2
fi
[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
num_processes=$1
shift
python=${PYTHON:-python}
devices=${CLAVER_DEVICES_PER_PROCESS:-2}
port=''
for _ in {1..100}; do  # A port nothing listens on (connecting to it fails).
  candidate=$((20000 + RANDOM % 40000))
  if ! (: >"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then
    port=$candidate
    break
  fi
done
[[ -n $port ]] || { echo "$NAME: found no free port on 127.0.0.1." >&2; exit 1; }

declare -A running=()   # pid -> process id
stopping=0

stop_all() {  # $1: signal for the processes still running
  local pid
  for pid in "${!running[@]}"; do
    kill "-$1" "$pid" 2>/dev/null || true
  done
}

# shellcheck disable=SC2329  # called by the trap below
on_signal() {
  if ((stopping)); then
    echo "$NAME: second interrupt: killing every process." >&2
    stop_all KILL
  else
    stopping=1
    echo "$NAME: stopping: every process saves a checkpoint and exits (again to kill)." >&2
    stop_all TERM
  fi
}
trap on_signal INT TERM

for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
    "$python" -m claver_jax.main "$@" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$num_processes" --process_id="$i" &
  running[$!]=$i
  echo "$NAME: process $i of $num_processes: pid $!" >&2
done

status=0
killer=''
while ((${#running[@]} > 0)); do
  finished=''
  code=0
  wait -n -p finished "${!running[@]}" || code=$?
  [[ -n ${finished:-} ]] || continue  # a signal arrived (wait unsets finished); passed on
  i=${running[$finished]}
  unset "running[$finished]"
  if ((code != 0)); then
    echo "$NAME: process $i (pid $finished) exited with status $code." >&2
    if ((status == 0)); then
      status=$code
      # The others would wait for it at their next collective: ask them to stop, then insist.
      stop_all TERM
      if ((${#running[@]} > 0)); then
        (sleep "$GRACE_SECONDS"; kill -KILL "${!running[@]}") </dev/null >/dev/null 2>&1 &
        killer=$!
      fi
    fi
  fi
done
[[ -z $killer ]] || kill "$killer" 2>/dev/null || true
exit "$status"
