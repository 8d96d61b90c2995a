"""Throughput and memory benchmarks; run as `python -m benchmarks.<name>`."""
