import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# tiny-random is built once into the project's (git-ignored) cache, not the user's home.
os.environ.setdefault("AUTOMEM_CACHE", str(ROOT / ".cache"))


@pytest.fixture
def boxoban_levels():
    """The Boxoban level folder from BOXOBAN_LEVELS; Boxoban tests skip, saying why, without it."""
    if not os.environ.get("BOXOBAN_LEVELS"):
        pytest.skip("BOXOBAN_LEVELS is not set: point it at a folder with hard/ and medium/train/ "
                    "(README, Install) to run the Boxoban tests")
    return Path(os.environ["BOXOBAN_LEVELS"])
