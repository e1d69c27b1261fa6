-- Runs once, when the postgres volume is first created: the basic-auth app keeps its users in a database
-- of its own (mlflow_entrypoint.py: POSTGRES_AUTH_DB, default mlflow_auth).
CREATE DATABASE mlflow_auth;
