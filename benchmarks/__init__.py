"""vitkern benchmarks: one shared harness (:mod:`vitkern.bench.harness`) and one ``bench_<name>.py`` per kernel family.

``python -m benchmarks.run_all`` discovers every ``bench_*.py`` module here, so adding a benchmark is dropping a
file in; see ``benchmarks/README.md``.
"""
