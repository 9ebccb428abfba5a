"""Local services the project starts itself on 127.0.0.1: Kafka, Redis, MLflow, Airflow, parameter-service servers."""
