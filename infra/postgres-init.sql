-- Prefect uses the database POSTGRES_DB creates (prefect); MLflow gets its own, and one for its users.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
