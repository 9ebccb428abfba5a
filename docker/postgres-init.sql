-- One PostgreSQL for the metadata of MLflow and Airflow.
CREATE DATABASE mlflow;
CREATE DATABASE airflow;
