"""Helpers of scripts/bench.py: the data set, the file systems under test, the workloads and
the report. Each module can be read alone; bench.py wires them together."""
