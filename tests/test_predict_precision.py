"""`foldtune predict --precision fp32|bf16` and `--chunk-size` (default chunking of long chains), on the shipped
demo base (a trained 0.5 M-parameter model, so bf16 rounding is not amplified by random weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data.structure import read_chain
from pipeline.cli import main
from pipeline.models import build_folding_model
from pipeline.predict import DEFAULT_CHUNK_SIZE, Target, chain_from_sequence, fold, load_base_model, predict_targets
from tests.shared_data import SHARED_STRUCTURES

DEMO_BASE = Path(__file__).resolve().parents[1] / "data" / "samples" / "demo_base"
DEMO_MODEL = {"source": "random", "size": {"trunk": {"max_recycles": 0}}, "base_run": str(DEMO_BASE)}


@pytest.fixture(scope="module")
def demo_base():
    return load_base_model({"model": DEMO_MODEL}).eval()


def _target(name: str = "1ubi.pdb") -> list[Target]:
    chain = read_chain(SHARED_STRUCTURES / name)
    return [Target(chain.pdb_id, chain_from_sequence(chain.pdb_id, chain.sequence))]


def test_chunked_trunk_equals_unchunked(demo_base):
    targets = _target("1ubi.pdb")  # 76 residues, chunks of 16 rows
    whole = fold(demo_base, targets)[0][0]
    demo_base.trunk.set_chunk_size(16)
    try:
        chunked = fold(demo_base, targets)[0][0]
    finally:
        demo_base.trunk.set_chunk_size(None)
    present = whole.atom37_mask > 0
    assert np.abs(whole.atom37_positions - chunked.atom37_positions)[present].max() <= 1e-4
    assert np.abs(whole.b_factors - chunked.b_factors).max() <= 1e-3


def test_bf16_prediction_is_close_to_fp32_with_an_fp32_structure_module(demo_base):
    """Measured (1ubi, 76 residues): CA RMSD 0.077 Å, all-atom max 0.29 Å, pLDDT max 0.23 (0-100); 1bhl (151):
    0.083 Å, 0.67 Å, 0.22."""
    targets = _target("1ubi.pdb")
    dtypes = {}

    def record(name):
        def hook(module, inputs, output) -> None:
            dtypes.setdefault(name, (output[0] if isinstance(output, tuple) else output).dtype)
        return hook

    hooks = [demo_base.trunk.blocks[0].seq_attention.o_proj.register_forward_hook(record("trunk")),
             demo_base.trunk.structure_module.ipa.register_forward_hook(record("structure_module"))]
    try:
        half = fold(demo_base, targets, precision="bf16")[0][0]
    finally:
        for hook in hooks:
            hook.remove()
    assert dtypes == {"trunk": torch.bfloat16, "structure_module": torch.float32}
    full = fold(demo_base, targets)[0][0]
    present = full.atom37_mask > 0
    ca = np.sqrt(((full.atom37_positions[:, 1] - half.atom37_positions[:, 1]) ** 2).sum(-1).mean())
    assert 0 < ca <= 0.25, f"bf16 vs fp32 CA RMSD {ca:.3f} Å"
    assert np.abs(full.atom37_positions - half.atom37_positions)[present].max() <= 1.5
    assert np.abs(full.b_factors - half.b_factors).max() <= 1.0
    assert half.atom37_positions.dtype == np.float32


def test_long_chains_are_chunked_by_default_short_ones_not(tmp_path):
    model = build_folding_model({"source": "random", "size": {"trunk": {"num_blocks": 0, "max_recycles": 0}}}).eval()
    seen = []
    hook = model.trunk.register_forward_pre_hook(lambda module, args: seen.append(module.chunk_size))
    try:
        long_chain = Target("long", chain_from_sequence("long", "MKTAYIAKQR" * 52))  # 520 residues
        short_chain = Target("short", chain_from_sequence("short", "MKTAYIAKQR" * 3))
        predict_targets(model, [long_chain, short_chain], tmp_path / "default", max_tokens=600, progress=False)
        predict_targets(model, [short_chain], tmp_path / "explicit", chunk_size=16, progress=False)
    finally:
        hook.remove()
    assert sorted(seen, key=lambda v: v or 0) == [None, 16, DEFAULT_CHUNK_SIZE]


@pytest.mark.parametrize("flags, name", [
    (["--chunk-size", "0"], "--chunk-size"),
    (["--chunk-size", "-8"], "--chunk-size"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--num-recycles", "-1"], "--num-recycles"),
])
def test_bad_prediction_options_exit_nonzero_with_one_line(tmp_path, capsys, flags, name):
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">x\nMKTAYIAKQR\n")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"model": DEMO_MODEL}))
    assert main(["predict", "--base-config", str(config), "--fasta", str(fasta), "--out", str(tmp_path / "o"),
                 "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"foldtune predict: {name}"), err
    assert not (tmp_path / "o").exists()


def test_precision_flag_on_the_command_line(tmp_path, capsys):
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">x\nMKTAYIAKQRQISFVKSHFSRQ\n")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"model": DEMO_MODEL}))
    common = ["predict", "--base-config", str(config), "--fasta", str(fasta), "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    assert main([*common, "--out", str(tmp_path / "fp32")]) == 0
    bf16, fp32 = (read_chain(tmp_path / d / "x.pdb") for d in ("bf16", "fp32"))
    assert 0 < np.abs(bf16.atom37_positions - fp32.atom37_positions).max() < 1.5
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--out", str(tmp_path / "fp16"), "--precision", "fp16"])
    assert exit_info.value.code == 2 and "--precision" in capsys.readouterr().err


def test_a_chunk_size_in_the_model_config_is_the_default(tmp_path):
    model = build_folding_model({"source": "random", "size": {"trunk": {"num_blocks": 0, "chunk_size": 8}}}).eval()
    seen = []
    hook = model.trunk.register_forward_pre_hook(lambda module, args: seen.append(module.chunk_size))
    try:
        predict_targets(model, [Target("s", chain_from_sequence("s", "MKTAYIAKQR"))], tmp_path / "o", progress=False)
    finally:
        hook.remove()
    assert seen == [8]
