"""Fuzzing that reaches depth: structure-aware generators, coverage-guided runs."""

from collections.abc import Callable

#: pytest's ``record_property`` fixture: each fuzz test records its figure (executions, depth)
#: for the run's "figures" section (tests/conftest.py), which xdist's workers reach too
Record = Callable[[str, object], None]
