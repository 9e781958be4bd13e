"""`foldtune train --dry-run` and the memory-plan lookup (pipeline/memory_plan.py)."""

from __future__ import annotations

import contextlib
import io

from pipeline import memory_plan
from pipeline.cli import main

PLAN = {"crops": {"128": {"lora+stem|off": 30.5, "lora+stem|on": 21.0, "lora frozen stem|off": 18.0,
                          "full|off": 90.0},
                  "256": {"lora+stem|off": 60.0, "lora+stem|on": 33.0}}}


def _cfg(**adapter) -> dict:
    return {"kind": "fold", "model": {"source": "esmfold_pretrained"}, "adapter": {"method": "lora", "part": "all", **adapter},
            "data": {"crop_size": 128, "batch_size": 1}, "trainer": {"grad_checkpointing": False}}


def test_estimate_reads_the_row_of_the_config():
    assert memory_plan.estimate(_cfg(), PLAN)[0] == 30.5
    assert memory_plan.estimate(_cfg(part="trunk"), PLAN)[0] == 18.0
    assert memory_plan.estimate(_cfg(method="full"), PLAN)[0] == 90.0
    cfg = _cfg()
    cfg["data"]["crop_size"], cfg["trainer"]["grad_checkpointing"] = 200, True
    gb, line = memory_plan.estimate(cfg, PLAN)
    assert gb == 33.0 and "measured crop 256 >= 200" in line  # the next measured crop up
    cfg["data"]["crop_size"] = 384
    assert memory_plan.estimate(cfg, PLAN)[0] is None


def test_other_shapes_have_no_estimate():
    cfg = _cfg()
    cfg["model"] = {"source": "random", "size": {}}
    gb, line = memory_plan.estimate(cfg, PLAN)
    assert gb is None and "ESMFold v1 shapes" in line


def test_dry_run_prints_one_line_and_exits(tmp_path):
    config = tmp_path / "v1.yaml"
    config.write_text("kind: fold\nmodel:\n  source: esmfold_pretrained\n  path: /nowhere\nadapter:\n  method: lora\n"
                      f"  part: all\ndata:\n  crop_size: 128\n  batch_size: 1\noutput_dir: {tmp_path / 'run'}\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "--config", str(config), "--dry-run"]) == 0
    assert out.getvalue().startswith("memory plan: ")
    assert not (tmp_path / "run").exists()  # nothing trained
