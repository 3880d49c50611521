import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Tests and CI read the Boxoban levels from the shared folder beside the project.
os.environ.setdefault("BOXOBAN_LEVELS", str(ROOT.parent / "shared" / "data" / "boxoban-levels"))
# tiny-random is built once into the project's (git-ignored) cache, not the user's home.
os.environ.setdefault("AUTOMEM_CACHE", str(ROOT / ".cache"))
