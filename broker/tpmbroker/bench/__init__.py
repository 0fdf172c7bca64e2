"""Benchmarks and the comparison systems tpmbroker is measured against."""
