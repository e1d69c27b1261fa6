#!/usr/bin/env python3
"""Start the MLflow tracking server with every credential taken from the environment.

The container runs `mlflow_entrypoint.py mlflow server --app-name basic-auth ...`: this script prepares the
environment, then replaces itself with that command (exec). No credential is ever put on a command line,
where `ps` and the Kubernetes API would show it.

- The tracking store: `mlflow server` reads --backend-store-uri from MLFLOW_BACKEND_STORE_URI itself (the
  option's environment variable). When that is unset it is built here from POSTGRES_USER,
  POSTGRES_PASSWORD, POSTGRES_HOST, POSTGRES_PORT and POSTGRES_DB (the docker-compose stack).
- The users of the basic-auth app: MLflow reads their database URI only from an ini file
  (MLFLOW_AUTH_CONFIG_PATH). It is written here, readable by this user only, from MLFLOW_AUTH_DATABASE_URI
  (or POSTGRES_* with POSTGRES_AUTH_DB, default mlflow_auth). MLFLOW_AUTH_DEFAULT_PERMISSION sets what
  every signed-in user may do with others' experiments (default READ).
- The admin account: MLflow itself reads MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD and creates
  the admin on first start (it ships no default password and refuses to start without one).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

AUTH_FUNCTION = "mlflow.server.auth:authenticate_request_basic_auth"


def postgres_uri(database: str, env: dict[str, str]) -> str | None:
    """SQLAlchemy URI of `database` from POSTGRES_*; None when no password is given."""
    password = env.get("POSTGRES_PASSWORD")
    if not password:
        return None
    user = quote(env.get("POSTGRES_USER", "mlflow"), safe="")
    host = env.get("POSTGRES_HOST", "postgres")
    port = env.get("POSTGRES_PORT", "5432")
    # Percent-encode: a password with '@', ':' or '/' would otherwise break the URI.
    return f"postgresql+psycopg://{user}:{quote(password, safe='')}@{host}:{port}/{database}"


def auth_ini(database_uri: str, default_permission: str) -> str:
    # MLflow parses the file with configparser's interpolation, where '%' starts a reference: a
    # percent-encoded password must be written as '%%'.
    escaped = database_uri.replace("%", "%%")
    return (
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {escaped}\n"
        f"authorization_function = {AUTH_FUNCTION}\n"
    )


def prepare(env: dict[str, str]) -> dict[str, str]:
    """The environment to exec `mlflow server` with; raises SystemExit naming what is missing."""
    env = dict(env)
    if not env.get("MLFLOW_BACKEND_STORE_URI"):
        uri = postgres_uri(env.get("POSTGRES_DB", "mlflow"), env)
        if uri is None:
            raise SystemExit("mlflow_entrypoint: set MLFLOW_BACKEND_STORE_URI, or POSTGRES_PASSWORD (+ POSTGRES_*)")
        env["MLFLOW_BACKEND_STORE_URI"] = uri
    auth_uri = env.get("MLFLOW_AUTH_DATABASE_URI") or postgres_uri(env.get("POSTGRES_AUTH_DB", "mlflow_auth"), env)
    if not auth_uri:
        raise SystemExit("mlflow_entrypoint: set MLFLOW_AUTH_DATABASE_URI, or POSTGRES_PASSWORD (+ POSTGRES_*)")
    folder = Path(tempfile.mkdtemp(prefix="mlflow-auth-"))  # mode 0700
    ini = folder / "basic_auth.ini"
    fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(auth_ini(auth_uri, env.get("MLFLOW_AUTH_DEFAULT_PERMISSION", "READ")))
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
    return env


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: mlflow_entrypoint.py mlflow server --app-name basic-auth [OPTIONS]")
    env = prepare(dict(os.environ))
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main(sys.argv[1:])
