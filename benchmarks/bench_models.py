"""End-to-end model benchmark (issue 9) in ``run_all``'s suite.

The benchmark itself is :mod:`vitkern.bench.models`: it ships in the package because ``vitkern bench`` runs its
providers on one model, also from an installed vitkern. Standalone: ``python -m vitkern.bench.models --help``.
"""

from vitkern.bench.models import BUDGET_S, NAME, run, targets

__all__ = ["BUDGET_S", "NAME", "run", "targets"]
