import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
FAMILY_FIXTURES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.npz").exists())


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref| over all logits."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture
def fixture_copy(tmp_path):
    """A writable copy of a golden fixture folder."""

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(FIXTURES / name, dst)
        return dst

    return copy
