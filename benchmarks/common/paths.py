"""Where the benchmarks read and write: the repository, the result folder and the Flickr8k copy."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results"
FLICKR8K = Path(os.environ.get("FLICKR8K_DIR", REPO.parent / "shared" / "data" / "flickr8k"))
