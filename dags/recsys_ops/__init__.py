"""Helpers of the project's DAGs: small functions the tasks call, importable without Airflow.

Kept out of DAG parsing by ``dags/.airflowignore``; heavy libraries (mlflow, feast, pandas)
are imported inside the functions, so a DAG file that imports this package stays fast.
"""
