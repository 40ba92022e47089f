"""Prefect tasks: thin wrappers over the pure functions in `finance_qlora`."""
