"""Benchmarks of the running appliance (``python -m appliance.bench gateway --help``)."""
