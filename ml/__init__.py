"""All pipeline logic as small typed functions; never imports airflow."""
