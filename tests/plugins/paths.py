"""Paths of the repository used by many tests."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
FIXTURES = REPO / "tests" / "fixtures"
SMI = FIXTURES / "nvidia-smi"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
