#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: creates it, installs this checkout on every worker, runs
# `python -m claver_jax.main` on all of them (--worker=all), and recreates it after preemption.
# Each worker gets a Python 3.11 environment made by uv with the versions of constraints.txt;
# main runs detached from the ssh session (a dropped ssh or a stopped launcher does not stop
# it; running the launcher again attaches to it), with transparent hugepages on, and each
# worker's log goes to WORKDIR/logs/worker-N.log (copied there every minute and at the end).
#
#   launch/tpu_pod.sh --name=claver-k400 --zone=us-central2-b --accelerator_type=v4-32 \
#       --workdir=gs://BUCKET/runs/k400 [options] -- --config=configs/k400.py [--config.KEY=V ...]
#
# Options:
#   --project=ID            GCP project (default: gcloud's configured one)
#   --runtime_version=V     TPU software version (default by accelerator: v4 tpu-ubuntu2204-base,
#                           v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
#   --spot                  Spot capacity; a preempted slice is deleted, recreated and the run
#                           resumes from its last checkpoint (up to --max_restarts times)
#   --create=queued|direct|none  `queued-resources create` (default), `tpu-vm create`, or use an
#                           existing TPU VM called --name
#   --max_restarts=N        recreations after preemption (default 20 with --spot, else 0)
#   --jax='jax[tpu]'        requirement for JAX with libtpu (constraints.txt pins its version)
#   --delete_after          delete the slice when the run has finished
#   --dry_run               print every command (gcloud, tar) instead of running it
# Every gs://BUCKET/PATH in --workdir and in the main arguments (data roots, init checkpoints)
# is mounted on each worker with gcsfuse at /gcs/BUCKET and passed to main as /gcs/BUCKET/PATH,
# so the workdir (checkpoints, metrics) and the data (array_record from
# `python -m claver_jax.data.prepare`, copied to GCS) live in Cloud Storage.
set -euo pipefail

readonly NAME=tpu_pod
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO
readonly POLL_SECONDS=${CLAVER_POLL_SECONDS:-60}
readonly GCS=${CLAVER_GCS_MOUNT:-/gcs}   # Where the workers mount the buckets.
# shellcheck disable=SC2016  # Expanded on the workers.
readonly RUN_DIR='"$HOME"/claver_run'  # On each worker: the detached job's pid, status and log.

usage() {
  sed -n '2,30s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
  exit 2
}

die() {
  echo "$NAME: $*" >&2
  exit 2
}

name='' zone='' accelerator='' workdir='' project='' runtime='' spot=0 create=queued
max_restarts='' jax_spec='jax[tpu]' delete_after=0 dry_run=0
while (($#)); do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator_type=*) accelerator=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --runtime_version=*) runtime=${1#*=} ;;
    --spot) spot=1 ;;
    --create=*) create=${1#*=} ;;
    --max_restarts=*) max_restarts=${1#*=} ;;
    --jax=*) jax_spec=${1#*=} ;;
    --delete_after) delete_after=1 ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    -h | --help) usage ;;
    *) die "unknown option $1 (main's arguments go after --); see --help." ;;
  esac
  shift
done
main_args=("$@")
[[ " ${main_args[*]} " != *' --dry_run '* ]] || die '--dry_run goes before --, not to main.'

[[ -n $name && -n $zone && -n $accelerator ]] ||
  die '--name, --zone and --accelerator_type are required; see --help.'
[[ $workdir == gs://?* ]] ||
  die "--workdir must be gs://BUCKET/PATH (every worker writes there); got '$workdir'."
[[ $create =~ ^(queued|direct|none)$ ]] || die "--create must be queued, direct or none."
if [[ -z $runtime ]]; then
  case $accelerator in
    v4-*) runtime=tpu-ubuntu2204-base ;;
    v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    *) die "no default --runtime_version for '$accelerator'; pass one." ;;
  esac
fi
max_restarts=${max_restarts:-$((spot ? 20 : 0))}
[[ $max_restarts =~ ^[0-9]+$ ]] || die "--max_restarts must be a number."

common=(--zone="$zone")
[[ -z $project ]] || common+=(--project="$project")

# gs://BUCKET/PATH -> /gcs/BUCKET/PATH (also as --flag=gs://...), and the buckets to mount.
declare -A buckets=()
remote_args=()
for arg in "--workdir=$workdir" "${main_args[@]}"; do
  if [[ $arg =~ ^(--[^=]+=)?gs://([^/]+)(.*)$ ]]; then
    buckets[${BASH_REMATCH[2]}]=1
    arg=${BASH_REMATCH[1]}$GCS/${BASH_REMATCH[2]}${BASH_REMATCH[3]}
  fi
  remote_args+=("$arg")
done
remote_workdir=${remote_args[0]#--workdir=}

# shellcheck source=dry_run.sh
source "$(dirname "${BASH_SOURCE[0]}")/dry_run.sh"

query() {  # query VAR ANSWER COMMAND...: VAR=$(COMMAND); with --dry_run, prints it, VAR=ANSWER.
  local var=$1 answer=$2 output=''
  shift 2
  if ((dry_run)); then
    run "$@"
    output=$answer
  else
    output=$("$@" 2>/dev/null) || output=''
  fi
  printf -v "$var" '%s' "$output"
}

tpu() { run gcloud compute tpus "$@" "${common[@]}"; }

on_workers() {  # $1: a shell command for every worker.
  tpu tpu-vm ssh "$name" --worker=all --command="$1"
}

node_state() {  # $1: the answer with --dry_run. Sets state: READY, PREEMPTED, ..., or ABSENT.
  query state "$1" gcloud compute tpus tpu-vm describe "$name" --format='value(state)' \
    "${common[@]}"
  state=${state:-ABSENT}
}

create_slice() {
  case $create in
    queued)
      local flags=(--node-id="$name" --accelerator-type="$accelerator"
                   --runtime-version="$runtime")
      ((spot)) && flags+=(--spot)
      tpu queued-resources create "$name" "${flags[@]}"
      while true; do  # WAITING_FOR_RESOURCES / PROVISIONING -> ACTIVE
        query state ACTIVE gcloud compute tpus queued-resources describe "$name" \
          --format='value(state.state)' "${common[@]}"
        case $state in
          ACTIVE) break ;;
          FAILED | SUSPENDED) die "queued resource $name is $state." ;;
        esac
        echo "$NAME: queued resource $name is $state; waiting." >&2
        sleep "$POLL_SECONDS"
      done
      ;;
    direct)
      local flags=(--accelerator-type="$accelerator" --version="$runtime")
      ((spot)) && flags+=(--spot)
      tpu tpu-vm create "$name" "${flags[@]}"
      ;;
  esac
}

delete_slice() {
  case $create in
    queued) tpu queued-resources delete "$name" --force --quiet ;;
    *) tpu tpu-vm delete "$name" --quiet ;;
  esac
}

mount_buckets() {  # Shell lines that mount every bucket on a worker (idempotent).
  local bucket
  # shellcheck disable=SC2016  # $USER is the worker's.
  for bucket in "${!buckets[@]}"; do
    printf 'sudo mkdir -p %s/%s && sudo chown "$USER" %s/%s && ' "$GCS" "$bucket" "$GCS" "$bucket"
    printf '{ mountpoint -q %s/%s || ' "$GCS" "$bucket"
    printf 'gcsfuse --implicit-dirs --rename-dir-limit=1000000 %s %s/%s; } && ' "$bucket" "$GCS" \
      "$bucket"
  done
}

# Shell lines: exit 0 on a worker whose detached run is still going (a launcher started again).
readonly RUNNING_GUARD="if [ -f $RUN_DIR/pid ] && kill -0 \"\$(cat $RUN_DIR/pid)\" 2>/dev/null; then
  echo 'claver: a run is going on here; attaching to it.'
  exit 0
fi"

install() {
  local archive
  archive=$(mktemp -u /tmp/claver_jax.XXXXXX.tgz)
  # The checkout without what is built or installed in it (virtual environments above all).
  run tar -czf "$archive" -C "$REPO" --exclude=.git --exclude=__pycache__ --exclude=venv \
    --exclude=.venv --exclude='*.egg-info' --exclude=.pytest_cache --exclude=build .
  tpu tpu-vm scp "$archive" "$name:claver_jax.tgz" --worker=all
  ((dry_run)) || rm -f "$archive"
  # gcsfuse from Google's apt repository; uv makes a Python 3.11 environment (TPU VM images
  # ship 3.10; jax, flax, orbax and grain need 3.11) with the versions of constraints.txt.
  on_workers "set -e
$RUNNING_GUARD
if ! command -v gcsfuse >/dev/null; then
  echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
rm -rf ~/claver_jax && mkdir -p ~/claver_jax && tar -xzf ~/claver_jax.tgz -C ~/claver_jax
python3 -m pip install -q --user 'uv>=0.4,<1'
~/.local/bin/uv venv -q --python 3.11 --allow-existing ~/claver_venv
~/.local/bin/uv pip install -q --python ~/claver_venv/bin/python \\
  -c ~/claver_jax/constraints.txt $(printf '%q' "$jax_spec") -e ~/claver_jax"
}

train() {  # Starts main on every worker, detached from this ssh session.
  local job command
  # The job: main in the background; its log copied to WORKDIR/logs every minute and at the
  # end; its exit status left in $RUN_DIR/status. SIGTERM (a preemption) is passed on to main,
  # which saves a checkpoint and exits.
  job="cd ~/claver_jax && echo \$\$ > $RUN_DIR/pid && rm -f $RUN_DIR/status
~/claver_venv/bin/python -m claver_jax.main$(printf ' %q' "${remote_args[@]}") \\
  > $RUN_DIR/main.log 2>&1 &
main=\$!
trap 'kill -TERM \$main' TERM
log=$(printf '%q' "$remote_workdir")/logs/worker-\$worker.log
(while sleep 60; do cp $RUN_DIR/main.log \"\$log\"; done) &
copier=\$!
while true; do wait \$main; status=\$?; kill -0 \$main 2>/dev/null || break; done
kill \$copier
cp $RUN_DIR/main.log \"\$log\"
echo \$status > $RUN_DIR/status"
  command="set -e
$RUNNING_GUARD
$(mount_buckets):
echo always | sudo tee /sys/kernel/mm/transparent_hugepage/enabled >/dev/null
worker=\$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)
export worker
mkdir -p $RUN_DIR $(printf '%q' "$remote_workdir")/logs
setsid nohup bash -c $(printf '%q' "$job") > $RUN_DIR/job.log 2>&1 < /dev/null &
echo \"claver: started on worker \$worker; log in $(printf '%q' "$remote_workdir")/logs/worker-\$worker.log\""
  on_workers "$command"
}

finished() {  # Polls the workers: 0 when every run ended with status 0, 1 while any runs, else 2.
  local reply line running=0 failed=0 seen=0
  query reply 'claver-status 0' gcloud compute tpus tpu-vm ssh "$name" --worker=all \
    --command="echo \"claver-status \$(cat $RUN_DIR/status 2>/dev/null || echo running)\"" \
    "${common[@]}"
  while read -r line; do
    [[ $line =~ ^claver-status\ (.*)$ ]] || continue
    seen=1
    case ${BASH_REMATCH[1]} in
      running) running=1 ;;
      0) ;;
      *) failed=1 ;;
    esac
  done <<<"$reply"
  ((failed)) && return 2
  ((running || !seen)) && return 1
  return 0
}

restarts=0
while true; do
  node_state ABSENT
  if [[ $state == ABSENT ]]; then
    [[ $create != none ]] || die "there is no TPU VM $name in $zone (--create=none)."
    create_slice
  fi
  install
  train
  status=1
  while true; do  # Until every worker's run has ended, or the slice is gone.
    node_state READY
    [[ $state == READY ]] || break
    status=0
    finished || status=$?
    ((status == 1)) || break
    sleep "$POLL_SECONDS"
  done
  if [[ $state == READY ]]; then
    ((status == 0)) ||
      die "main failed on a worker; its log is in $workdir/logs/; $name is kept."
    break
  fi
  # Preempted (or gone) mid-run: the workdir holds the last checkpoint, a new slice resumes it.
  [[ $create != none ]] || die "$name is $state; with --create=none it is not recreated."
  ((restarts < max_restarts)) ||
    die "$name is $state after $restarts restarts (--max_restarts=$max_restarts); giving up."
  restarts=$((restarts + 1))
  echo "$NAME: $name is $state; recreating it (restart $restarts of $max_restarts)." >&2
  delete_slice
done
if ((delete_after)) && [[ $create != none ]]; then
  delete_slice
fi
echo "$NAME: done; metrics in $workdir/metrics.jsonl." >&2
