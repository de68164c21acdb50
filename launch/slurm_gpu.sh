#!/usr/bin/env bash
# Trains on GPU nodes under Slurm: one task per node, each driving all of its node's GPUs.
#
#   launch/slurm_gpu.sh --nodes=2 [options] -- --config=configs/k400.py --workdir=/shared/runs/k400
#
# Options:
#   --nodes=N            nodes (default 1)
#   --gpus_per_node=G    GPUs per node (default 8)
#   --partition=P --account=A --time=HH:MM:SS (default 24:00:00) --job_name=NAME (default claver)
#   --python=PATH        interpreter with claver_jax installed, on every node (default: python)
#   --grace=SECONDS      Slurm sends SIGTERM this long before the time limit, so that every
#                        process saves a checkpoint and exits 0 (default 300)
#   --cpus_per_task=N    CPUs of the node's one task, for its input workers (default: all the
#                        node's, SLURM_CPUS_ON_NODE; Slurm would give it one)
#   --mem=SIZE           memory per node (default 0: all of it)
#   --shared             do not ask for whole nodes (--exclusive is the default)
#   --mem_fraction=F     XLA_PYTHON_CLIENT_MEM_FRACTION, the share of each GPU JAX takes (0.9)
#   --sbatch_arg=ARG     any other sbatch option, e.g. --sbatch_arg=--qos=high (repeatable)
#   --dry_run            print the sbatch command and the srun command of the job, submit nothing
# The script submits itself with sbatch (--requeue: a preempted job starts again and resumes from
# its last checkpoint; --open-mode=append: a requeued job adds to the same log). In the job,
# `srun` starts main once per node with XLA's latency-hiding scheduler on, and jax.distributed
# finds the other tasks from Slurm's variables (coordinator: the first node). Run it from the
# repository root, where configs/ is; the workdir must be on a file system every node sees.
# A run stopped by the time limit resumes when the same command is submitted again. On
# preemption Slurm sends SIGTERM and kills after the partition's GraceTime (`scontrol show
# partition`): main saves after the step it is in, so a GraceTime of at least a step and a
# checkpoint write keeps that step; with less, the run resumes from its last periodic checkpoint.
set -euo pipefail

readonly NAME=slurm_gpu

usage() {
  sed -n '2,31s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
  exit 2
}

die() {
  echo "$NAME: $*" >&2
  exit 2
}

nodes=1 gpus_per_node=8 partition='' account='' time_limit=24:00:00 job_name=claver
python=python grace=300 dry_run=0 in_job=0 cpus_per_task='' mem=0 exclusive=1 mem_fraction=0.9
sbatch_args=()
while (($#)); do
  case $1 in
    --nodes=*) nodes=${1#*=} ;;
    --gpus_per_node=*) gpus_per_node=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --account=*) account=${1#*=} ;;
    --time=*) time_limit=${1#*=} ;;
    --job_name=*) job_name=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --grace=*) grace=${1#*=} ;;
    --cpus_per_task=*) cpus_per_task=${1#*=} ;;
    --mem=*) mem=${1#*=} ;;
    --shared) exclusive=0 ;;
    --mem_fraction=*) mem_fraction=${1#*=} ;;
    --sbatch_arg=*) sbatch_args+=("${1#*=}") ;;
    --dry_run) dry_run=1 ;;
    --in_job) in_job=1 ;;
    --) shift; break ;;
    -h | --help) usage ;;
    *) die "unknown option $1 (main's arguments go after --); see --help." ;;
  esac
  shift
done
main_args=("$@")
[[ " ${main_args[*]} " != *' --dry_run '* ]] || die '--dry_run goes before --, not to main.'
[[ $nodes =~ ^[1-9][0-9]*$ && $gpus_per_node =~ ^[1-9][0-9]*$ && $grace =~ ^[0-9]+$ ]] ||
  die '--nodes and --gpus_per_node must be positive numbers, --grace a number of seconds.'
[[ -z $cpus_per_task || $cpus_per_task =~ ^[1-9][0-9]*$ ]] ||
  die '--cpus_per_task must be a positive number.'
[[ $mem_fraction =~ ^0?\.[0-9]+$|^1(\.0*)?$ ]] || die '--mem_fraction must be in (0, 1].'
printf '%s\n' "${main_args[@]}" | grep -q -- '^--workdir=' ||
  die 'main needs --workdir=DIR (on a shared file system) after --; see --help.'

# Inside the job: every GPU of the node to the node's one process (JAX's Slurm default would be
# one GPU per task), one task per node with the node's CPUs (srun does not inherit sbatch's
# --cpus-per-task since Slurm 22.05), XLA's latency-hiding scheduler (overlaps the gradient
# all-reduce with the backward pass).
# shellcheck disable=SC2016  # With --dry_run, printed for the job to expand.
cpus=${cpus_per_task:-${SLURM_CPUS_ON_NODE:-'$SLURM_CPUS_ON_NODE'}}
in_job_command=(env "CLAVER_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus_per_node - 1)))"
                "XLA_PYTHON_CLIENT_MEM_FRACTION=$mem_fraction"
                "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"
                srun --ntasks-per-node=1 --cpus-per-task="$cpus" --kill-on-bad-exit=1
                "$python" -m claver_jax.main "${main_args[@]}")
if ((in_job)); then
  exec "${in_job_command[@]}"
fi

# Sourced only here: inside the job this script runs from Slurm's spool copy, beside nothing.
# shellcheck source=dry_run.sh
source "$(dirname "${BASH_SOURCE[0]}")/dry_run.sh"

submit=(sbatch --job-name="$job_name" --nodes="$nodes" --ntasks-per-node=1
        --gpus-per-node="$gpus_per_node" --mem="$mem" --time="$time_limit"
        --signal="TERM@$grace" --requeue --open-mode=append --output="$job_name-%j.out")
((exclusive)) && submit+=(--exclusive)
[[ -z $cpus_per_task ]] || submit+=(--cpus-per-task="$cpus_per_task")
[[ -z $partition ]] || submit+=(--partition="$partition")
[[ -z $account ]] || submit+=(--account="$account")
submit+=("${sbatch_args[@]}" "${BASH_SOURCE[0]}" --in_job --gpus_per_node="$gpus_per_node"
         --python="$python" --mem_fraction="$mem_fraction"
         ${cpus_per_task:+--cpus_per_task="$cpus_per_task"} -- "${main_args[@]}")
run "${submit[@]}"
if ((dry_run)); then
  echo "# The job then runs:"
  run "${in_job_command[@]}"
fi
