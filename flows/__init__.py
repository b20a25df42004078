"""Prefect flows and deployments of the weightsmith pipeline (the library itself is `pipeline`)."""
