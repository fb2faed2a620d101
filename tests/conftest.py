import os
import sys

import pytest

# tests/problems.py is imported as a plain module by the test files.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _no_backend_from_environment(monkeypatch):
    """Tests choose backends themselves: a CPOLY_BACKEND in the caller's environment must not leak in."""
    monkeypatch.delenv("CPOLY_BACKEND", raising=False)
