"""Where things are: the repository root and the shared Flickr8k folder (``FLICKR8K_DIR`` overrides)."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FLICKR8K = Path(os.environ.get("FLICKR8K_DIR", REPO.parent / "shared" / "data" / "flickr8k"))
