"""Benchmark suite: measurements behind the paper's tables (cost, quality), written as JSON."""
