"""Find the read-only real data folder (`../shared/data` or `$MSDN_SHARED_DATA`).

Tests and benchmarks reach the real data through this one function only.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MSDN_SHARED_DATA"


def find_shared_data() -> Path:
    """Return the shared data folder or raise FileNotFoundError saying where it was looked for."""
    candidates = []
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for path in candidates:
        if (path / "xlsa17").is_dir():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"shared data folder not found (looked in: {looked}); set ${ENV_VAR} to the folder that "
        "holds xlsa17/, attribute_w2v/ and cub100_subset/")
