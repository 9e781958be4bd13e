"""Scoring is light: `pipeline.metrics`, `pipeline.scoring` and `foldtune score` never import torch or
transformers (a single score call is a short process; importing them costs ~2 s), and one `foldtune score A B`
does not import pandas either (~0.35 s; the batch modes need it for their tables) or numba (~0.5 s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.shared_data import SHARED_STRUCTURES

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "lightning", "esm")
SINGLE_SCORE_HEAVY = HEAVY + ("pandas", "numba")


def _loaded_after(code: str, modules: tuple[str, ...] = HEAVY) -> dict:
    script = code + f"\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {modules!r}}}))\n"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_metrics_and_scoring_import_without_torch():
    loaded = _loaded_after("import pipeline.metrics, pipeline.scoring, data.structure, data.chains")
    assert not any(loaded.values()), loaded


def test_score_command_runs_without_torch():
    model, ref = SHARED_STRUCTURES / "7sgn_C_model.pdb", SHARED_STRUCTURES / "7sgn_C_target.pdb"
    loaded = _loaded_after(
        "import contextlib, io, json\nfrom pipeline.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    assert main(['score', {str(model)!r}, {str(ref)!r}, '--json']) == 0\n"
        "assert 0 < json.loads(out.getvalue())['tm_score'] <= 1\n",
        SINGLE_SCORE_HEAVY,
    )
    assert not any(loaded.values()), loaded
