"""Fuzzing that reaches depth: structure-aware generators, coverage-guided runs."""
