"""Benchmarks: `metarl bench` (fleet, scale, learner suites)."""
