"""Benchmarks: offline throughput vs transformers, online latency, and the GPU 8B-shape run."""

from engine.bench.runner import machine_info, run_offline_compare, run_online_rates
from engine.bench.workload import BenchRequest, WorkloadSpec, make_workload, percentile

__all__ = [
    "BenchRequest",
    "WorkloadSpec",
    "machine_info",
    "make_workload",
    "percentile",
    "run_offline_compare",
    "run_online_rates",
]
