#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: creates it, installs this checkout on every worker, runs
# `python -m claver_jax.main` on all of them (--worker=all), and recreates it after preemption.
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
#   --jax='jax[tpu]'        pip requirement for JAX with libtpu, e.g. 'jax[tpu]==0.10.2'
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
readonly POLL_SECONDS=30

usage() {
  sed -n '2,26s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
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
    arg=${BASH_REMATCH[1]}/gcs/${BASH_REMATCH[2]}${BASH_REMATCH[3]}
  fi
  remote_args+=("$arg")
done

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
    printf 'sudo mkdir -p /gcs/%s && sudo chown "$USER" /gcs/%s && ' "$bucket" "$bucket"
    printf '{ mountpoint -q /gcs/%s || ' "$bucket"
    printf 'gcsfuse --implicit-dirs --rename-dir-limit=1000000 %s /gcs/%s; } && ' "$bucket" "$bucket"
  done
}

install() {
  local archive
  archive=$(mktemp -u /tmp/claver_jax.XXXXXX.tgz)
  run tar -czf "$archive" -C "$REPO" --exclude=.git --exclude=__pycache__ --exclude=venv .
  tpu tpu-vm scp "$archive" "$name:claver_jax.tgz" --worker=all
  ((dry_run)) || rm -f "$archive"
  # gcsfuse from Google's apt repository; the package and JAX with libtpu into ~/claver_venv.
  on_workers "set -e
if ! command -v gcsfuse >/dev/null; then
  echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
rm -rf ~/claver_jax && mkdir -p ~/claver_jax && tar -xzf ~/claver_jax.tgz -C ~/claver_jax
python3 -m venv ~/claver_venv
~/claver_venv/bin/pip install -q -U pip
~/claver_venv/bin/pip install -q $(printf '%q' "$jax_spec") -e ~/claver_jax"
}

train() {
  local command
  command="$(mount_buckets)cd ~/claver_jax && ~/claver_venv/bin/python -m claver_jax.main"
  command+=$(printf ' %q' "${remote_args[@]}")
  on_workers "$command"
}

restarts=0
while true; do
  node_state ABSENT
  if [[ $state == ABSENT ]]; then
    [[ $create != none ]] || die "there is no TPU VM $name in $zone (--create=none)."
    create_slice
  fi
  install
  status=0
  train || status=$?
  node_state READY
  if [[ $state == READY ]]; then
    ((status == 0)) || die "main failed on the workers (status $status); $name is kept."
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
