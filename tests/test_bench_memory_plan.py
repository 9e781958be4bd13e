"""benchmarks/bench_memory_plan.py: the per-unit fit, the extrapolation arithmetic, reuse and the memory budget."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest

from benchmarks import bench_memory_plan as plan
from benchmarks.common import REPO_ROOT


def _fit_points(crop: int = 128, precision: str = "fp32", scale: float = 1.0) -> dict:
    points = {(1, 1, False): 1000.0, (2, 1, False): 1300.0, (1, 2, False): 1500.0, (1, 1, True): 1100.0,
              (1, 2, True): 1090.0}
    return {plan.Point(crop, n, m, "lora+stem", ckpt, precision=precision): {"peak_mb": v * scale}
            for (n, m, ckpt), v in points.items()}


def test_fit_is_the_unit_differences():
    points = {plan.Point(128, 1, 1, "lora+stem", False): 1000.0, plan.Point(128, 2, 1, "lora+stem", False): 1300.0,
              plan.Point(128, 1, 2, "lora+stem", False): 1500.0}
    fits = plan.fit({p: {"peak_mb": v} for p, v in points.items()}, [128])[128]
    assert fits["stem_layer"]["lora+stem"] == 300.0 and fits["block"]["off"] == 500.0
    assert fits["fixed"]["lora+stem"] == 200.0
    assert plan.predict_mb(fits, "lora+stem", False, 36, 48, trainable=0) == 200.0 + 36 * 300 + 48 * 500
    fits = plan.fit(_fit_points(), [128], block_floor_mb=55.0)[128]
    assert fits["block"]["on"] == 55.0  # a negative difference is noise: at least the block's weights
    assert fits["ckpt_offset"]["on"] == 1100.0 - 200.0 - 300.0 - 55.0
    assert plan.predict_mb(fits, "lora+stem", True, 1, 1, trainable=0) == 1100.0
    assert plan.fitted_peak_mb(fits, 1, 3, True) == 1100.0 + 2 * 55.0


def test_each_precision_is_fitted_from_its_own_points_and_failed_points_are_left_out():
    results = {**_fit_points(precision="fp32"), **_fit_points(precision="bf16", scale=0.5)}
    results[plan.Point(128, 3, 1, "lora+stem", False, precision="bf16")] = {"failed": "over budget"}
    fp32 = plan.fit(results, [128], precision="fp32")[128]
    bf16 = plan.fit(results, [128], precision="bf16")[128]
    assert fp32["stem_layer"]["lora+stem"] == 300.0 and bf16["stem_layer"]["lora+stem"] == 150.0
    assert bf16["fixed"]["lora+stem"] == 100.0


def test_a_missing_block_point_is_extrapolated_quadratically_and_spares_the_checkpointed_rows():
    # T(L) = w + a L + b L^2 with w = 50, a = 2, b = 0.01 at crops 128 and 256; crop 384 lacks its (1, 2) point
    def block(length: int) -> float:
        return 50 + 2 * length + 0.01 * length * length

    results = {}
    for crop in (128, 256, 384):
        base = {(1, 1, False): 5000.0, (2, 1, False): 5300.0, (1, 2, False): 5000.0 + block(crop),
                (1, 1, True): 4000.0, (1, 2, True): 4100.0}
        if crop == 384:
            del base[(1, 2, False)]
        results.update({plan.Point(crop, n, m, "lora+stem", ckpt): {"peak_mb": v}
                        for (n, m, ckpt), v in base.items()})
    fits = plan.fit(results, [128, 256, 384], block_floor_mb=50.0)
    assert fits[384]["block"]["off"] == pytest.approx(block(384))
    assert "extrapolated from crops 128, 256" in fits[384]["estimated"]
    # the checkpointed prediction is (1,1)_on + (N-1) S + (M-1) T_on whatever the estimate
    assert plan.fitted_peak_mb(fits[384], 36, 48, True) == pytest.approx(4000.0 + 35 * 300 + 47 * 100)


def test_a_method_not_measured_at_a_crop_carries_its_offset_from_the_nearest_crop_below():
    results = {**_fit_points(128), **_fit_points(256, scale=2.0)}
    results[plan.Point(128, 1, 1, "full", False)] = {"peak_mb": 1300.0}  # with S + 200: F + 100
    results[plan.Point(128, 2, 1, "full", False)] = {"peak_mb": 1800.0}  # S + 200 against lora+stem
    fits = plan.fit(results, [128, 256])
    fixed, layer, source = plan.mode_terms(fits, 256, "full")
    assert (fixed, layer) == (fits[256]["fixed"]["lora+stem"] + 100.0, fits[256]["stem_layer"]["lora+stem"] + 200.0)
    assert source == "lora+stem + offset of crop 128"
    assert plan.mode_terms(fits, 128, "full")[2] == "measured"
    assert plan.mode_terms(fits, 256, "lorta+stem")[2] == "as lora+stem (mode not measured)"


def test_reuse_reads_the_old_and_the_new_table_and_keeps_failed_points(tmp_path):
    table = tmp_path / "earlier.md"
    table.write_text("| 128 | 1 | 1 | lora+stem | off | 1476 | 0.53 | 18.8 |\n"
                     "| 384 | bf16 | 1 | 2 | lora+stem | off | 9000 | 0.68 | 91.5 | 2026-12-02 17:30 |\n"
                     "| 384 | fp32 | 1 | 3 | lora+stem | off | over budget: RSS > 12 GiB, stopped |  |  | "
                     "2026-12-02 17:40 |\n| crop | precision | header |\n")
    found = plan.reuse(table)
    assert found[plan.Point(128, 1, 1, "lora+stem", False)] == {"peak_mb": 1476.0, "trainable": 530000,
                                                              "seconds": 18.8, "measured": "earlier run"}
    assert found[plan.Point(384, 1, 2, "lora+stem", False, precision="bf16")]["peak_mb"] == 9000.0
    assert found[plan.Point(384, 1, 3, "lora+stem", False)]["failed"].startswith("over budget")
    assert len(found) == 3


def test_the_plan_measures_the_fit_points_at_every_crop_and_the_methods_where_asked():
    points = plan.plan([128, 384], precision="bf16", mode_crops=[128], depth_crops=[384])
    at_384 = {(p.layers, p.blocks, p.mode, p.checkpointing) for p in points if p.crop == 384}
    assert {(1, 1, "lora+stem", False), (2, 1, "lora+stem", False), (1, 2, "lora+stem", False),
            (1, 1, "lora+stem", True), (1, 2, "lora+stem", True), (3, 1, "lora+stem", False),
            (1, 3, "lora+stem", True)} <= at_384
    assert not any(p.mode in ("full", "lora frozen stem") for p in points if p.crop == 384)
    assert all(p.precision == "bf16" for p in points)


def test_a_point_the_fit_puts_over_the_budget_is_not_started():
    known = {**_fit_points()}
    deep = plan.Point(128, 1, 3, "lora+stem", False)
    results = plan.measure_points([*known, deep], threads=1, known=known, max_gib=1500.0 / 1024,
                                  fresh_process=False)
    assert results[deep]["failed"] == "not run: fitted 2.0 GiB > budget 1.46484 GiB"  # 200 + 300 + 3 x 500 MiB


def test_a_worker_past_the_budget_stops_itself():
    point = plan.Point(32, 1, 1, "lora+stem", False, widths="tiny")
    payload = {"point": asdict(point), "threads": 1, "max_gib": 0.01}  # below what importing torch takes
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory_plan", "--worker", json.dumps(payload)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == plan.OVER_BUDGET and "over budget: RSS" in proc.stderr


def test_bad_input_is_one_line(capsys):
    with pytest.raises(SystemExit):
        plan.main(["--crops", "abc"])
    assert "'abc': expected a whole number of residues" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plan.main(["--reuse", "/nowhere/earlier.md"])
    assert "--reuse: /nowhere/earlier.md: no such file" in capsys.readouterr().err
