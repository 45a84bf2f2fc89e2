"""CPU-side benchmarks (pytest-benchmark): host costs measured on the machine at hand; see test_host_side.py."""
