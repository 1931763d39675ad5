"""Airflow-side glue: alert routing, storage through Airflow connections, shared DAG defaults."""
