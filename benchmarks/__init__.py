"""Namespace lab, real OpenSSH server, lab services and the benchmark harness (`python -m benchmarks`)."""
