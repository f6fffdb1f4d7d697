"""Prefect flows and tasks: thin recipes over slip_core and datasets."""
