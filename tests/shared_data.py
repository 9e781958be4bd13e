"""Where the real structures shared by the project live: `shared/` beside the repository (as CI checks it
out), or the workplace's copy."""

from pathlib import Path

SHARED_STRUCTURES = Path(__file__).resolve().parents[2] / "shared" / "data" / "structures"
if not SHARED_STRUCTURES.is_dir():
    SHARED_STRUCTURES = Path("/work/shared/data/structures")
