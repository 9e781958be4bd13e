"""`foldtune train --dry-run` and the memory-plan lookup (pipeline/memory_plan.py)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from pipeline import memory_plan
from pipeline.cli import main


def _q(crop: int) -> float:
    """A quadratic in L (what every predicted term is at most), so the interpolation can be checked exactly."""
    return 10.0 + 0.01 * crop + 0.0005 * crop * crop


PLAN = {"precisions": {
    "fp32": {"128": {"lora+stem|off": 30.5, "lora+stem|on": 21.0, "lora frozen stem|off": 18.0, "full|off": 90.0},
             "256": {"lora+stem|off": 60.0, "lora+stem|on": 33.0}},
    "bf16": {str(c): {"lora+stem|on": round(_q(c), 6), "lora frozen stem|on": 5.0, "full|on": 52.5}
             for c in (128, 256, 384)}}}


def _cfg(precision: str = "32", crop: int = 128, checkpointing: bool = False, **adapter) -> dict:
    return {"kind": "fold", "model": {"source": "esmfold_pretrained"}, "adapter": {"method": "lora", "part": "all", **adapter},
            "data": {"crop_size": crop, "batch_size": 1},
            "trainer": {"grad_checkpointing": checkpointing, "precision": precision}}


def test_estimate_reads_the_fp32_row_of_the_config():
    assert memory_plan.estimate(_cfg(), PLAN)[0] == 30.5
    assert memory_plan.estimate(_cfg(part="trunk"), PLAN)[0] == 18.0
    assert memory_plan.estimate(_cfg(method="full"), PLAN)[0] == 90.0
    # fp32 has two measured crops: between them the next one up (an upper bound)
    gb, line = memory_plan.estimate(_cfg(crop=200, checkpointing=True), PLAN)
    assert gb == 33.0 and "measured crop 256 >= 200" in line and "fp32" in line
    gb, line = memory_plan.estimate(_cfg(crop=384, checkpointing=True), PLAN)
    assert gb is None and "above the measured fp32 crops (128, 256)" in line


@pytest.mark.parametrize("precision", ["bf16-mixed", "auto", "16-mixed"])
def test_a_bf16_config_reads_the_bf16_rows(precision):
    gb, line = memory_plan.estimate(_cfg(precision, crop=256, checkpointing=True), PLAN)
    assert gb == PLAN["precisions"]["bf16"]["256"]["lora+stem|on"] and ", bf16" in line
    assert memory_plan.estimate(_cfg(precision, crop=256, checkpointing=True, part="trunk"), PLAN)[0] == 5.0
    # the bf16 table has no row without checkpointing: not read from the fp32 table instead
    gb, line = memory_plan.estimate(_cfg(precision, crop=256), PLAN)
    assert gb is None and "not measured (bf16)" in line


def test_precisions_the_plan_does_not_cover_have_no_estimate():
    gb, line = memory_plan.estimate(_cfg("bf16-true"), PLAN)
    assert gb is None and "bf16-true not measured" in line
    assert memory_plan.plan_precision("32-true") == ("fp32", "")
    assert memory_plan.plan_precision("auto")[0] == "bf16"


def test_crops_between_measured_ones_follow_the_quadratic_through_three():
    table = PLAN["precisions"]["bf16"]
    gb, how = memory_plan.row_at_crop(table, "lora+stem|on", 320)
    assert gb == pytest.approx(_q(320), rel=1e-9) and "quadratic in L through measured crops 128, 256, 384" in how
    gb, _ = memory_plan.row_at_crop(table, "lora+stem|on", 200)
    assert gb == pytest.approx(_q(200), rel=1e-9)
    # a constant row (the optimizer-state floor of 'full') stays constant
    assert memory_plan.row_at_crop(table, "full|on", 300)[0] == pytest.approx(52.5)
    # below the smallest crop: that crop's row; above the largest: none
    assert memory_plan.row_at_crop(table, "lora+stem|on", 64) == (table["128"]["lora+stem|on"],
                                                                  " (measured crop 128 >= 64)")
    assert memory_plan.row_at_crop(table, "lora+stem|on", 400) is None
    # a quadratic that overshoots between two noisy rows is kept between them
    bumpy = {"128": {"k": 10.0}, "256": {"k": 30.0}, "384": {"k": 31.0}}
    gb, _ = memory_plan.row_at_crop(bumpy, "k", 320)
    assert 30.0 <= gb <= 31.0


def test_other_shapes_have_no_estimate():
    cfg = _cfg()
    cfg["model"] = {"source": "random", "size": {}}
    gb, line = memory_plan.estimate(cfg, PLAN)
    assert gb is None and "ESMFold v1 shapes" in line


def test_the_shipped_plan_has_fp32_and_bf16_at_the_issue_crops():
    """pipeline/memory_plan.json as measured (docs/benchmarks.md section 5): crops 128 / 256 / 384 in fp32, bf16
    at 128 / 256 at least, and every row the dry run of a shipped config can ask for."""
    plan = memory_plan.load_plan()
    assert plan is not None
    assert {"128", "256", "384"} <= set(plan["precisions"]["fp32"])
    assert {"128", "256"} <= set(plan["precisions"]["bf16"])
    for precision, table in plan["precisions"].items():
        for crop, rows in table.items():
            assert {"lora+stem|on", "lora frozen stem|on", "full|on", "lorta+stem|on"} <= set(rows), (precision, crop)
            # checkpointing never costs memory, and 'full' at least holds weights + gradients + AdamW (> 50 GB)
            if "lora+stem|off" in rows:
                assert rows["lora+stem|on"] <= rows["lora+stem|off"], (precision, crop)
            assert rows["full|on"] > 50


def _write_config(tmp_path, precision: str, crop: int) -> str:
    config = tmp_path / "v1.yaml"
    config.write_text("kind: fold\nmodel:\n  source: esmfold_pretrained\n  path: /nowhere\nadapter:\n  method: lora\n"
                      f"  part: all\ndata:\n  crop_size: {crop}\n  batch_size: 1\ntrainer:\n  precision: {precision}\n"
                      f"  grad_checkpointing: true\noutput_dir: {tmp_path / 'run'}\n")
    return str(config)


def test_dry_run_prints_the_bf16_row_of_the_shipped_plan_and_exits(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "--config", _write_config(tmp_path, "bf16-mixed", 256), "--dry-run"]) == 0
    expected = json.loads(memory_plan.PLAN_FILE.read_text())["precisions"]["bf16"]["256"]["lora+stem|on"]
    line = out.getvalue().strip()
    assert line.startswith("memory plan: ESMFold v1, lora+stem, crop 256, trunk checkpointing on, bf16: ")
    assert f"predicted step peak {expected:.1f} GB" in line
    assert not (tmp_path / "run").exists()  # nothing trained


def test_dry_run_of_an_fp32_config_prints_the_fp32_row(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "--config", _write_config(tmp_path, "32-true", 384), "--dry-run"]) == 0
    expected = json.loads(memory_plan.PLAN_FILE.read_text())["precisions"]["fp32"]["384"]["lora+stem|on"]
    assert f"crop 384, trunk checkpointing on, fp32: predicted step peak {expected:.1f} GB" in out.getvalue()


def test_the_gpu_warning_uses_the_row_and_the_device_memory(monkeypatch, capsys):
    import torch

    from pipeline.commands.train import warn_if_over_gpu_memory

    class _Props:
        total_memory = 40 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: _Props())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "FakeGPU 40GB")
    gb, line = memory_plan.estimate(_cfg("bf16-mixed", crop=256, checkpointing=True, part="trunk"), PLAN)
    assert not warn_if_over_gpu_memory(gb, line)  # 5 GB on 40 GB
    gb, line = memory_plan.estimate(_cfg("bf16-mixed", crop=256, checkpointing=True, method="full"), PLAN)
    assert warn_if_over_gpu_memory(gb, line)  # 52.5 GB on 40 GB
    err = capsys.readouterr().err
    assert "full, crop 256, trunk checkpointing on, bf16" in err and "> 40 GB on FakeGPU 40GB" in err
