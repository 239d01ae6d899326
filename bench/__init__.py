"""Benchmarks (not timed tests). Run `python -m bench.tunnel_bench`; see its module doc."""
