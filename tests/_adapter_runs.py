"""Run directories for the adapter-travel tests, written as `foldtune train` writes them, without training.

A run is the pipeline's own base (`pipeline.train._build`), its adapter set to random values (and, with
train_heads, the distogram head moved), saved with `save_trained` next to RUN/config.yaml.
"""

from __future__ import annotations

from pathlib import Path

import torch

import adapters
from data.io import atomic_write_text
from pipeline.config import dump_config, resolve
from pipeline.train import _build, save_trained


def make_run(root: Path, name: str, adapter: dict, model: dict | None = None, seed: int = 0,
             scale: float = 0.05) -> Path:
    """Write root/name/{config.yaml, adapter/} for `adapter` on the tiny random base (+ `model` keys)."""
    run = root / name
    cfg = resolve({"adapter": adapter, "model": model or {}, "trainer": {"seed": seed},
                   "output_dir": str(run)})
    built, _ = _build(cfg)
    generator = torch.Generator().manual_seed(1000 + seed + len(name))
    trained = [p for p in built.parameters() if p.requires_grad]
    with torch.no_grad():
        for param in trained:
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "config.yaml", dump_config(cfg))
    save_trained(built, run / "adapter")
    assert adapters.attached(built) is not None
    return run
