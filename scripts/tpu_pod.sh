#!/usr/bin/env bash
# Pretrains on every worker of a Cloud TPU VM (a single host or a pod slice): copies this checkout
# to each worker, installs it with JAX's TPU build, then runs the same run.py command everywhere;
# `--multihost` lets jax.distributed.initialize() find the other workers by itself.
#
#   scripts/tpu_pod.sh TPU_NAME ZONE --config configs/pretrain.py:caco,r50,1m \
#     --workdir /mnt/shared/runs/caco_r50_1m --config.data.archive=/mnt/shared/data/caco1m
#
# The workdir (and config.data.data_dir, by default <workdir>/tfds) must be on storage every worker
# sees at the same path: process 0 alone prepares the records and the others read them (see
# docs/running.md). Set CACO_JAX_PROJECT to pass --project to gcloud, CACO_JAX_INSTALL=0 to skip
# the copy and install on a rerun.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE RUN_PY_FLAGS... (e.g. --config configs/pretrain.py:caco,r50,1m --workdir /mnt/shared/runs/x)" >&2
  exit 2
fi
tpu_name=$1
zone=$2
shift 2

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone" --worker=all)
if [[ -n "${CACO_JAX_PROJECT:-}" ]]; then
  where+=(--project="$CACO_JAX_PROJECT")
fi
checkout=$(cd "$(dirname "$0")/.." && pwd)
jax_version=$(sed -n 's/^jax==//p' "$checkout/requirements.txt")

if [[ "${CACO_JAX_INSTALL:-1}" != 0 ]]; then
  archive=$(mktemp --suffix=.tar.gz)
  trap 'rm -f "$archive"' EXIT
  # The committed tree (git archive), or the folder as it is outside a git checkout.
  if git -C "$checkout" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$checkout" archive --format=tar.gz -o "$archive" HEAD
  else
    tar -czf "$archive" -C "$checkout" --exclude=.venv --exclude=workdir .
  fi
  "${gcloud_tpu[@]}" scp "$archive" "$tpu_name":caco_jax.tar.gz "${where[@]}"
  "${gcloud_tpu[@]}" ssh "$tpu_name" "${where[@]}" --command="
    set -e
    rm -rf ~/caco_jax && mkdir ~/caco_jax && tar -xzf ~/caco_jax.tar.gz -C ~/caco_jax
    cd ~/caco_jax && python3 -m venv .venv
    .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==$jax_version'"
fi

# The same command on every worker; printf %q keeps each flag one word through the remote shell.
"${gcloud_tpu[@]}" ssh "$tpu_name" "${where[@]}" --command="
  cd ~/caco_jax && .venv/bin/python run.py --multihost $(printf '%q ' "$@")"
