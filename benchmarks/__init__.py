"""Benchmarks: `make bench` writes docs/benchmarks.md. Outside the package: nothing here ships in the wheel."""
