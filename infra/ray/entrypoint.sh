#!/usr/bin/env bash
# The cluster entrypoint: the same DVC DAG as `make repro`, run as one Ray job.
#
#   ray job submit --working-dir . --runtime-env infra/ray/runtime_env.yaml -- bash infra/ray/entrypoint.sh [DVC REPRO ARGS]
#
# Ray starts this on the head node, in the uploaded copy of the repository. That copy has no .git
# (.rayignore) and lives in a per-job temporary folder, so this script
#   1. moves the run into PIPELINE_WORKSPACE when it is set: a persistent folder on the shared volume
#      (same path on every node) where shards, models, dvc.lock and DVC's cache survive the job, so a
#      resubmitted job skips finished stages and resumes training instead of starting over;
#   2. tells DVC there is no git (core.no_scm: DVC otherwise stops with "... is not a git repository");
#   3. runs `dvc repro`. Each stage joins this cluster: Ray sets RAY_ADDRESS for the job's driver and its
#      children, and pipeline.training.trainer.init_ray() joins whatever RAY_ADDRESS names.
# Every step prints a timestamped line, readable with `ray job logs -f SUBMISSION_ID`.
#
# Environment (all optional):
#   PIPELINE_WORKSPACE  persistent run folder on shared storage (the cluster configs set
#                       /mnt/shared/resnet-pipeline); unset: run in the uploaded copy (outputs are lost
#                       with the job, except checkpoints under train.storage_path and MLflow runs)
#   PIPELINE_PARAMS     a params file of the repository to run with, e.g. configs/imagenet-resnet50.yaml
#                       (a preset is written over params.yaml, a whole file copied); unset: the uploaded params.yaml
#   PIPELINE_GIT_COMMIT the code's commit when neither the job metadata (git_commit) nor a
#                       .pipeline-commit file beside the code (written by infra/docker/Dockerfile) has it
#   PIPELINE_RUN_GROUP  MLflow run group of every run of this job; default commit-<first 12 of the commit>
#   DVC_SITE_CACHE_DIR  where DVC keeps its hash cache (which file has which md5, by inode, mtime and size);
#                       the cluster configs set it on the shared volume, and with PIPELINE_WORKSPACE it
#                       defaults to WORKSPACE/.dvc/site_cache: DVC's own default, /var/tmp/dvc, goes with
#                       the pod or container, and the next job would re-hash every shard and raw image
set -euo pipefail

log() { printf '[entrypoint %s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }
die() { log "ERROR: $*"; exit 1; }
# A URI as it may be logged: userinfo (the user and password before @host) replaced by ***, so a tracking server's or a
# database's password in MLFLOW_TRACKING_URI never reaches the job log.
redact() { sed -E 's#([A-Za-z][A-Za-z0-9+.-]*://)[^[:space:]]+@#\1***@#g'; }
redact_uri() { printf '%s' "$1" | redact; }

START_S=$(date +%s)
trap 'rc=$?; log "finished: exit code $rc after $(( $(date +%s) - START_S )) s"' EXIT

PYTHON=${PYTHON:-python}
export DVC_NO_ANALYTICS=${DVC_NO_ANALYTICS:-1}
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK=${MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK:-true}

# job_meta KEY: a value of this Ray job's metadata (`ray job submit --metadata-json`, plus Ray's own
# job_submission_id); empty outside a Ray job. Ray passes it to the driver in RAY_JOB_CONFIG_JSON_ENV_VAR.
job_meta() {
    "$PYTHON" -c 'import json, os, sys
cfg = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
print((cfg.get("metadata") or {}).get(sys.argv[1], ""))' "$1"
}

SRC=$(pwd -P)
[[ -f "$SRC/dvc.yaml" && -d "$SRC/.dvc" ]] ||
    die "$SRC has no dvc.yaml or .dvc/: submit from the repository root (--working-dir .)"
command -v dvc >/dev/null ||
    die "dvc is not on PATH: the cluster image must install requirements.txt (a local head: run \`ray start\` with .venv/bin on PATH)"

SUBMISSION_ID=$(job_meta job_submission_id)
log "job ${SUBMISSION_ID:-<not a Ray job>} on $(uname -n), uploaded code in $SRC"

# Provenance: without .git, pipeline.tracking cannot read the commit. `ray job submit` passes it as job
# metadata (docs/cluster.md); code baked into the image carries it in .pipeline-commit.
COMMIT=$(job_meta git_commit)
if [[ -z "$COMMIT" && -f "$SRC/.pipeline-commit" ]]; then
    COMMIT=$(<"$SRC/.pipeline-commit")
fi
export PIPELINE_GIT_COMMIT=${COMMIT:-${PIPELINE_GIT_COMMIT:-unknown}}
if [[ -z "${PIPELINE_RUN_GROUP:-}" ]]; then
    if [[ "$PIPELINE_GIT_COMMIT" != unknown ]]; then
        PIPELINE_RUN_GROUP="commit-${PIPELINE_GIT_COMMIT:0:12}"
    else
        PIPELINE_RUN_GROUP="ray-${SUBMISSION_ID:-$(date -u +%Y%m%dT%H%M%SZ)}"
    fi
fi
export PIPELINE_RUN_GROUP

# 1. The persistent workspace.
if [[ -n "${PIPELINE_WORKSPACE:-}" ]]; then
    mkdir -p "$PIPELINE_WORKSPACE" || die "cannot create PIPELINE_WORKSPACE=$PIPELINE_WORKSPACE"
    WORKSPACE=$(cd "$PIPELINE_WORKSPACE" && pwd -P)
    if [[ "$WORKSPACE" != "$SRC" ]]; then
        log "syncing code into workspace $WORKSPACE (its outputs, dvc.lock and .dvc state are kept)"
        # The upload carries no outputs (.rayignore). Its dvc.lock describes the submitter's own outputs,
        # not the workspace's: copying it would make DVC rerun every stage.
        tar -C "$SRC" -cf - \
            --exclude=./dvc.lock --exclude=./.dvc/cache --exclude=./.dvc/tmp --exclude=./.dvc/config.local \
            --exclude=./.dvc/site_cache . |
            tar -C "$WORKSPACE" -xf -
    fi
    cd "$WORKSPACE"
    export DVC_SITE_CACHE_DIR=${DVC_SITE_CACHE_DIR:-$WORKSPACE/.dvc/site_cache}
    log "DVC hash cache: $DVC_SITE_CACHE_DIR"
else
    log "PIPELINE_WORKSPACE unset: running in the uploaded copy; its outputs go when the job ends"
fi

# 2. DVC without git.
if [[ ! -d .git ]]; then
    dvc config --local core.no_scm true
    log "no .git here: set DVC core.no_scm in .dvc/config.local"
fi

if [[ -n "${PIPELINE_PARAMS:-}" ]]; then
    [[ -f "$PIPELINE_PARAMS" ]] || die "PIPELINE_PARAMS=$PIPELINE_PARAMS: no such file in $(pwd -P)"
    if grep -q '^extends:' "$PIPELINE_PARAMS"; then  # a preset: its keys over the default (docs/presets.md)
        "$PYTHON" -m pipeline.config preset "$PIPELINE_PARAMS" params.yaml ||
            die "PIPELINE_PARAMS=$PIPELINE_PARAMS: could not be written as params.yaml"
        log "params: $PIPELINE_PARAMS over the default params.yaml"
    else
        cp "$PIPELINE_PARAMS" params.yaml
        log "params: $PIPELINE_PARAMS (copied to params.yaml)"
    fi
fi

log "workspace: $(pwd -P)"
log "commit: $PIPELINE_GIT_COMMIT, MLflow run group: $PIPELINE_RUN_GROUP"
if [[ -n "${MLFLOW_TRACKING_URI:-}" ]]; then
    log "MLflow: $(redact_uri "$MLFLOW_TRACKING_URI")"
else
    log "MLflow: <unset: the embedded sqlite:///$(pwd -P)/mlflow.db>"
fi
if [[ -n "${RAY_ADDRESS:-}" ]]; then
    log "Ray: stages join the cluster at RAY_ADDRESS=$(redact_uri "$RAY_ADDRESS")"
    if command -v ray >/dev/null; then
        timeout 60 ray status --address "$RAY_ADDRESS" 2>&1 | redact || log "(ray status failed; continuing)"
    fi
else
    log "Ray: RAY_ADDRESS unset, each stage starts a local Ray on this machine"
fi

# 3. The DAG.
log "dvc repro $*"
dvc repro "$@"

if [[ $# -eq 0 ]]; then   # the whole DAG ran: show its results (stage targets leave metrics half-made)
    log "done; metrics:"
    dvc metrics show || true
fi
if [[ -f reports/error_table.md ]]; then
    log "reports/error_table.md:"
    cat reports/error_table.md
fi
log "outputs are in $(pwd -P): models/, metrics/, reports/ (docs/cluster.md: where things live)"
