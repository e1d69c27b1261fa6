#!/usr/bin/env bash
# A local MLflow tracking server for the pipeline, without Docker: `make mlflow-server`, or
#   infra/mlflow/local/serve.sh
# then, in the shell that runs the pipeline:
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#
# It binds 127.0.0.1 only, keeps runs and the model registry in a database and serves artifacts itself
# (--serve-artifacts): clients upload and download through the server, so they need no access to the
# artifact store. Unlike the embedded sqlite:///mlflow.db, any number of processes may log at once.
#
# Settings, all from the environment (nothing secret is ever put on the command line, where `ps` shows it):
#   MLFLOW_BACKEND_STORE_URI      runs + registry; default sqlite:///$MLFLOW_SERVER_DIR/mlflow.db.
#                                 PostgreSQL: postgresql+psycopg://USER:PASSWORD@HOST:5432/DB (mlflow reads
#                                 this variable itself; it is not passed as an argument).
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts are stored; default $MLFLOW_SERVER_DIR/artifacts (or s3://...)
#   MLFLOW_SERVER_DIR             state folder for the defaults; default <repo>/mlflow-server (mode 700)
#   MLFLOW_PORT                   default 5000
#   MLFLOW_SERVER_WORKERS         uvicorn workers; default 2
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  default false (MLflow's GenAI job workers; the pipeline needs none)
#   MLFLOW_SERVER_AUTH            "none" (default) or "basic": MLflow's basic-auth app. Then also:
#     MLFLOW_AUTH_ADMIN_PASSWORD      the admin's password, required on the first start (MLflow ships none);
#                                     MLFLOW_AUTH_ADMIN_USERNAME (default admin)
#     MLFLOW_AUTH_DATABASE_URI        the users database; default sqlite:///$MLFLOW_SERVER_DIR/basic_auth.db
#     MLFLOW_FLASK_SERVER_SECRET_KEY  signs UI cookies; default: a random key per start (UI users sign in again)
#   Clients then set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (read by MLflow, never logged).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd -P)
STATE=${MLFLOW_SERVER_DIR:-$ROOT/mlflow-server}
MLFLOW=${MLFLOW_BIN:-$ROOT/.venv/bin/mlflow}
PORT=${MLFLOW_PORT:-5000}
WORKERS=${MLFLOW_SERVER_WORKERS:-2}
AUTH=${MLFLOW_SERVER_AUTH:-none}

if [[ ! -x $MLFLOW ]]; then
    echo "serve.sh: $MLFLOW not found: run 'make setup' (or set MLFLOW_BIN)" >&2
    exit 2
fi
(umask 077 && mkdir -p "$STATE")

export MLFLOW_BACKEND_STORE_URI=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$STATE/mlflow.db}
# The server's job runner (a pool of huey worker processes) serves GenAI features the pipeline does not use.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
ARTIFACTS=${MLFLOW_ARTIFACTS_DESTINATION:-$STATE/artifacts}
if [[ $ARTIFACTS != *://* ]]; then  # a local folder: absolute, so the server's working directory is irrelevant
    mkdir -p "$ARTIFACTS"
    ARTIFACTS=$(cd "$ARTIFACTS" && pwd -P)
fi

args=(server --host 127.0.0.1 --port "$PORT" --workers "$WORKERS"
      --serve-artifacts --artifacts-destination "$ARTIFACTS")

case $AUTH in
    none)
        echo "serve.sh: MLflow on http://127.0.0.1:$PORT (no authentication; loopback only), artifacts in $ARTIFACTS"
        exec "$MLFLOW" "${args[@]}"
        ;;
    basic)
        export MLFLOW_AUTH_DATABASE_URI=${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$STATE/basic_auth.db}
        if [[ -z ${MLFLOW_FLASK_SERVER_SECRET_KEY:-} ]]; then
            MLFLOW_FLASK_SERVER_SECRET_KEY=$("$(dirname "$MLFLOW")/python" -c 'import secrets; print(secrets.token_hex(32))')
            export MLFLOW_FLASK_SERVER_SECRET_KEY
        fi
        echo "serve.sh: MLflow on http://127.0.0.1:$PORT with basic auth, artifacts in $ARTIFACTS"
        # The entrypoint writes MLflow's auth config (the users database URI) into a private temporary
        # file and execs the server: the same path as the Docker and Kubernetes deployments.
        exec "$(dirname "$MLFLOW")/python" "$ROOT/infra/mlflow/mlflow_entrypoint.py" \
            "$MLFLOW" "${args[@]}" --app-name basic-auth
        ;;
    *)
        echo "serve.sh: MLFLOW_SERVER_AUTH must be 'none' or 'basic', not '$AUTH'" >&2
        exit 2
        ;;
esac
