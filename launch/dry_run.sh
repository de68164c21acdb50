# shellcheck shell=bash disable=SC2154
# Shared by tpu_pod.sh and slurm_gpu.sh (sourced, not run): printing commands for --dry_run.
# The caller sets dry_run=0|1.

quote() {  # One shell word, readable: --flag='value with spaces', 'it'\''s'.
  local word=$1 flag=''
  if [[ $word =~ ^[][A-Za-z0-9_./:=@%+,-]*$ ]]; then
    printf '%s' "$word"
    return
  fi
  if [[ $word =~ ^(--[A-Za-z0-9_-]+=)\$([A-Z_]+)$ ]]; then  # For the job to expand.
    printf '%s"$%s"' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
    return
  fi
  if [[ $word =~ ^(--[A-Za-z0-9_-]+=)(.*)$ ]]; then
    flag=${BASH_REMATCH[1]}
    word=${BASH_REMATCH[2]}
  fi
  printf "%s'%s'" "$flag" "${word//\'/\'\\\'\'}"
}

run() {  # Runs a command, or prints it with --dry_run.
  if ((dry_run)); then
    local word line=''
    for word in "$@"; do
      line+="${line:+ }$(quote "$word")"
    done
    printf '%s\n' "$line"
  else
    "$@"
  fi
}
