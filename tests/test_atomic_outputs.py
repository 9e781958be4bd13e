"""Atomically written outputs get the mode a plain `open` gives them (0666 minus the umask), not mkstemp's
0600, and identical runs write identical adapter bytes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from data.io import atomic_path, atomic_write_text
from pipeline.cli import main
from tests._adapter_runs import make_run
from tests.shared_data import SHARED_STRUCTURES


@pytest.fixture()
def umask():
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what any other program would create
    atomic_write_text(tmp_path / "a.txt", "x")
    with atomic_path(tmp_path / "b.csv") as tmp:
        tmp.write_text("x")
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "b.csv") == _mode(plain) == 0o666 & ~mask


def test_command_outputs_are_group_readable_under_umask_027(tmp_path, umask):
    umask(0o027)
    assert main(["prepare", "--in", str(SHARED_STRUCTURES / "1l2y.pdb"), "--out", str(tmp_path / "ds"),
                 "--no-progress"]) == 0
    run = make_run(tmp_path, "run", {"method": "lora", "rank": 2, "targets": ["attn"], "part": "trunk"})
    outputs = [tmp_path / "ds" / "manifest.csv", tmp_path / "ds" / "errors.csv",
               tmp_path / "ds" / "chains" / "1l2y_A.npz", run / "config.yaml",
               run / "adapter" / "adapter_model.safetensors", run / "adapter" / "adapter_config.json"]
    assert {path.name: oct(_mode(path)) for path in outputs} == {path.name: oct(0o640) for path in outputs}


def test_identical_runs_write_identical_adapter_bytes(tmp_path):
    runs = []
    for i in (0, 1):
        torch.manual_seed(0)  # the fresh heads' initialisation (training seeds it from trainer.seed)
        runs.append(make_run(tmp_path / str(i), "run", {"method": "lora", "rank": 2, "targets": ["attn", "mlp"],
                                                         "part": "trunk"}, model={"train_heads": True}))
    weights = [(run / "adapter" / "adapter_model.safetensors").read_bytes() for run in runs]
    assert weights[0] == weights[1] and len(weights[0]) > 1000
