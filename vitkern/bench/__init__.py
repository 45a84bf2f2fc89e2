"""Benchmarking that ships with the package: the shared harness (:mod:`~vitkern.bench.harness`), the end-to-end
model benchmark (:mod:`~vitkern.bench.models`) and the ``vitkern bench`` command (:mod:`~vitkern.bench.cli`).
The per-kernel benchmarks live in the repository's ``benchmarks/``."""
