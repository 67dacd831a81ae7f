"""Benchmarks of hlip-fed, each run as ``python -m benchmarks.<name>`` from the repository root
(docs/benchmarks.md lists them with their measured figures)."""
