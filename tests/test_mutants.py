"""CI runs the mutation check: every protection removed in turn is caught by an assertion.

The script (tests/mutants.py) works on a copy of the tree and ends the pytest runs it starts;
see its docstring and docs/reliability.md for what it plants.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(330)  # 29 mutants, two at a time: about a minute; a loaded CI runner more
def test_every_planted_protection_removal_is_killed_by_an_assertion():
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "mutants.py")], cwd=ROOT,
                       capture_output=True, timeout=300)
    out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
    assert r.returncode == 0, out[-8000:]
    assert "SURVIVED" not in out
    print(out.splitlines()[-1])  # "N/N mutants killed in S s" (shown with -s)
