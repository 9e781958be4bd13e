"""benchmarks/bench_memory_plan.py: the per-unit fit and the extrapolation arithmetic."""

from __future__ import annotations

from benchmarks import bench_memory_plan as plan


def test_fit_is_the_unit_differences():
    points = {plan.Point(128, 1, 1, "lora+stem", False): 1000.0, plan.Point(128, 2, 1, "lora+stem", False): 1300.0,
              plan.Point(128, 1, 2, "lora+stem", False): 1500.0}
    fits = plan.fit({p: {"peak_mb": v} for p, v in points.items()}, [128])[128]
    assert fits["stem_layer"]["lora+stem"] == 300.0 and fits["block"]["off"] == 500.0
    assert fits["fixed"]["lora+stem"] == 200.0
    assert plan.predict_mb(fits, "lora+stem", False, 36, 48, trainable=0) == 200.0 + 36 * 300 + 48 * 500
    points.update({plan.Point(128, 1, 1, "lora+stem", True): 1100.0, plan.Point(128, 1, 2, "lora+stem", True): 1090.0})
    fits = plan.fit({p: {"peak_mb": v} for p, v in points.items()}, [128], block_floor_mb=55.0)[128]
    assert fits["block"]["on"] == 55.0  # a negative difference is noise: at least the block's weights
    assert fits["ckpt_offset"]["on"] == 1100.0 - 200.0 - 300.0 - 55.0
    assert plan.predict_mb(fits, "lora+stem", True, 1, 1, trainable=0) == 1100.0
