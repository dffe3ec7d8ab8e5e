"""Benchmarks and virtual-time simulations (see README.md); a package so that tests can import
their scenarios (`from bench.twelve_weeks import run_scenario`)."""
