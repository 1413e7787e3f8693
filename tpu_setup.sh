#!/usr/bin/env bash
# Create (or reuse) a Cloud TPU VM or pod slice, install jaxunlearn with the 'tpu' extra on every
# worker, and launch one jaxunlearn command on all workers. Run with --help for the options.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: tpu_setup.sh --name NAME --zone ZONE [options] [-- JAXUNLEARN_ARGS...]

Creates the TPU VM NAME unless it exists (a stopped one is started), installs jaxunlearn[tpu]
on every worker into ~/jaxunlearn-venv (Python 3.11 through uv; skipped when the worker already
has this exact source), then runs `jaxunlearn JAXUNLEARN_ARGS...` on all workers at once.
On a pod slice every worker runs the same command; jaxunlearn detects the TPU and joins the
workers into one run (jax.distributed). The run directory must be on storage that every worker
sees (e.g. a gcsfuse mount or Filestore); a worker's own disk is not enough for a multi-host run.

options (each also read from the environment variable shown):
  --name NAME              TPU VM name                                   JAXUNLEARN_TPU_NAME
  --zone ZONE              zone, e.g. us-central2-b                      JAXUNLEARN_TPU_ZONE
  --project PROJECT        Google Cloud project (default: gcloud config) JAXUNLEARN_TPU_PROJECT
  --accelerator-type TYPE  e.g. v4-8, v4-32, v5litepod-16, v6e-8         JAXUNLEARN_TPU_TYPE
                           (needed only to create the TPU)
  --version RUNTIME        TPU runtime version (default by generation:   JAXUNLEARN_TPU_VERSION
                           v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                           v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot                   create a Spot TPU                             JAXUNLEARN_TPU_SPOT=1
  --repo URL               install from this git repository instead of   JAXUNLEARN_TPU_REPO
                           copying the local checkout
  --ref REF                git ref to install (default: HEAD; with       JAXUNLEARN_TPU_REF
                           --repo, a branch, tag or commit)
  --reinstall              install even when the workers have this source
  --detach                 run the command under nohup (log: ~/jaxunlearn-run.log on each worker)
  --dry-run                print every command instead of running it (assumes the TPU does not
                           exist yet and the workers have nothing installed)
  -h, --help               this help

Without --repo, the local checkout's commit REF (`git archive`; uncommitted changes are not
included) is copied to every worker with `gcloud compute tpus tpu-vm scp`.

example:
  ./tpu_setup.sh --name mox --zone us-central2-b --accelerator-type v4-32 -- \
      unlearn experiments/configs/tofu_llama2.yaml --run /mnt/shared/runs/mox-forget10
USAGE
}

die() {
  echo "tpu_setup.sh: error: $*" >&2
  exit 2
}

NAME=${JAXUNLEARN_TPU_NAME:-}
ZONE=${JAXUNLEARN_TPU_ZONE:-}
PROJECT=${JAXUNLEARN_TPU_PROJECT:-}
ACCELERATOR=${JAXUNLEARN_TPU_TYPE:-}
RUNTIME=${JAXUNLEARN_TPU_VERSION:-}
SPOT=${JAXUNLEARN_TPU_SPOT:-0}
REPO=${JAXUNLEARN_TPU_REPO:-}
REF=${JAXUNLEARN_TPU_REF:-HEAD}
REINSTALL=0
DETACH=0
DRY_RUN=0
COMMAND=()

value() {  # value FLAG NEXT_ARG: the flag's argument, or an error when it has none
  [[ $# -ge 2 && -n $2 ]] || die "$1: missing value"
  printf '%s' "$2"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --name) NAME=$(value "$@"); shift 2 ;;
    --zone) ZONE=$(value "$@"); shift 2 ;;
    --project) PROJECT=$(value "$@"); shift 2 ;;
    --accelerator-type) ACCELERATOR=$(value "$@"); shift 2 ;;
    --version) RUNTIME=$(value "$@"); shift 2 ;;
    --repo) REPO=$(value "$@"); shift 2 ;;
    --ref) REF=$(value "$@"); shift 2 ;;
    --spot) SPOT=1; shift ;;
    --reinstall) REINSTALL=1; shift ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; COMMAND=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ -n $NAME ]] || die "--name (or JAXUNLEARN_TPU_NAME) is required"
[[ -n $ZONE ]] || die "--zone (or JAXUNLEARN_TPU_ZONE) is required"

TPU=(compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
if [[ -n $PROJECT ]]; then WHERE+=(--project "$PROJECT"); fi
VENV="\$HOME/jaxunlearn-venv"  # \$HOME is expanded by the worker's shell
SRC="\$HOME/jaxunlearn"
STAMP_FILE="$SRC/.installed-source"

quote() {  # one word as a shell reads it back: bare when safe, else in single quotes
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

show() {  # print a command the way a shell would read it back
  local word line="+"
  for word in "$@"; do line+=" $(quote "$word")"; done
  echo "$line"
}

run() {  # run a command, or only print it with --dry-run
  show "$@"
  if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}

on_workers() {  # on_workers SHELL_COMMAND: run it on every worker of the TPU
  run gcloud "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$1"
}

default_runtime() {
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime version for accelerator type $1; pass --version" ;;
  esac
}

# ---------------------------------------------------------------- 1. the TPU VM
ensure_tpu() {
  local state=""
  if [[ $DRY_RUN -eq 1 ]]; then
    show gcloud "${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)'
    echo "# (dry run: assuming $NAME does not exist)"
  elif state=$(gcloud "${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null); then
    echo "TPU $NAME exists (state ${state:-unknown}); reusing it"
    if [[ $state == STOPPED ]]; then run gcloud "${TPU[@]}" start "$NAME" "${WHERE[@]}"; fi
    return 0
  fi
  [[ -n $ACCELERATOR ]] || die "TPU $NAME does not exist; --accelerator-type is needed to create it"
  local runtime=${RUNTIME:-$(default_runtime "$ACCELERATOR")}
  local create=(gcloud "${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$ACCELERATOR" --version "$runtime")
  if [[ $SPOT -eq 1 ]]; then create+=(--spot); fi
  run "${create[@]}"
}

# ---------------------------------------------------------------- 2. jaxunlearn on every worker
source_stamp() {  # what identifies the source to install: the repo URL (or "local") and the commit
  if [[ -n $REPO ]]; then
    echo "$REPO@$REF"
  else
    local here commit
    here=$(cd "$(dirname "$0")" && pwd)
    commit=$(git -C "$here" rev-parse --verify --quiet "$REF^{commit}" 2>/dev/null) ||
      die "$REF is not a commit of a git checkout at $here; pass --ref COMMIT, or --repo URL --ref REF"
    echo "local@$commit"
  fi
}

install() {
  local stamp=$1 check
  check="test \"\$(cat $STAMP_FILE 2>/dev/null)\" = $(quote "$stamp") && $VENV/bin/jaxunlearn --help >/dev/null"
  if [[ $DRY_RUN -eq 1 ]]; then
    show gcloud "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$check"
    echo "# (dry run: assuming the workers do not have $stamp)"
  elif [[ $REINSTALL -eq 0 ]] && gcloud "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$check" >/dev/null 2>&1; then
    echo "every worker already has jaxunlearn from $stamp; skipping the install (--reinstall to force)"
    return 0
  fi
  local fetch
  if [[ -n $REPO ]]; then
    fetch="rm -rf $SRC && git clone --quiet $(quote "$REPO") $SRC && git -C $SRC checkout --quiet $(quote "$REF")"
  else
    local here archive
    here=$(cd "$(dirname "$0")" && pwd)
    archive=$(mktemp -u "${TMPDIR:-/tmp}/jaxunlearn-XXXXXX.tar.gz")
    run git -C "$here" archive --format=tar.gz -o "$archive" "$REF"
    run gcloud "${TPU[@]}" scp "$archive" "$NAME:jaxunlearn.tar.gz" "${WHERE[@]}" --worker=all
    if [[ $DRY_RUN -eq 0 ]]; then rm -f "$archive"; fi
    fetch="rm -rf $SRC && mkdir -p $SRC && tar -xzf \$HOME/jaxunlearn.tar.gz -C $SRC && rm \$HOME/jaxunlearn.tar.gz"
  fi
  local uv="\$HOME/.local/bin/uv"
  on_workers "set -e; $fetch; python3 -m pip install --quiet --user uv; \
$uv venv --quiet --allow-existing --python 3.11 $VENV; \
$uv pip install --quiet --python $VENV/bin/python -e \"$SRC\"'[tpu]'; \
echo $(quote "$stamp") > $STAMP_FILE"
}

# ---------------------------------------------------------------- 3. the command
launch() {
  local args="" word
  for word in "${COMMAND[@]}"; do args+=" $(quote "$word")"; done
  if [[ $DETACH -eq 1 ]]; then
    on_workers "cd $SRC && nohup $VENV/bin/jaxunlearn$args < /dev/null > \$HOME/jaxunlearn-run.log 2>&1 &"
  else
    on_workers "cd $SRC && $VENV/bin/jaxunlearn$args"
  fi
}

STAMP=$(source_stamp)  # before anything is created: a bad --ref fails here
ensure_tpu
install "$STAMP"
if [[ ${#COMMAND[@]} -gt 0 ]]; then launch; fi
