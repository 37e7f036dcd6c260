-- The compose file's Postgres holds two databases: `mlflow` (POSTGRES_DB, made by the image) and this one.
CREATE DATABASE prefect;
