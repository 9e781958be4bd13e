"""Save -> predict round trip: PDBs with pLDDT B-factors and native numbering, adapter reload, baselines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from data.dataset import chain_path, load_chain
from data.structure import read_chain
from pipeline.cli import main
from pipeline.config import resolve
from pipeline.predict import Target, fold, load_run_model, targets_from_dataset
from pipeline.train import train
from tests._train_helpers import STRUCTURES, make_dataset


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    # 1vii is numbered 41-76 in its file: a numbering that is not 1..L
    ds, splits = make_dataset(root / "dataset", [("1l2y.pdb", "train"), ("1vii.pdb", "test"), ("1psm.cif", "test")])
    cfg = resolve({
        "adapter": {"method": "lora", "rank": 2, "alpha": 4, "part": "all"},
        "model": {"train_heads": True},
        "data": {"dataset": str(ds), "splits": str(splits), "crop_size": 16, "batch_size": 1, "val_split": None},
        "trainer": {"max_steps": 2, "lr": 1e-2, "warmup_steps": 0, "threads": 2},
        "output_dir": str(root / "run"),
    })
    result = train(cfg)
    return result.run_dir, ds, splits, root, result.model


def test_predict_writes_pdbs_with_plddt_and_native_numbering(trained_run):
    run, ds, splits, root, _ = trained_run
    out = root / "pred"
    assert main(["predict", "--run", str(run), "--dataset", str(ds), "--splits", str(splits), "--split", "test",
                 "--out", str(out), "--no-progress", "--max-tokens", "40"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns) == ["chain_id", "pdb", "mean_plddt", "ptm", "length"]
    assert table["chain_id"].tolist() == ["1vii_A", "1psm_A"]
    for row in table.itertuples():
        native = load_chain(chain_path(ds, row.chain_id))
        predicted = read_chain(row.pdb)
        assert predicted.residue_index.tolist() == native.residue_index.tolist()
        assert predicted.sequence == native.sequence and row.length == len(native.sequence)
        ca_b = predicted.b_factors[:, 1]
        assert 0.0 <= ca_b.min() and ca_b.max() <= 100.0 and ca_b.max() > 1.0  # 0-100, not HF's 0-1
        assert row.mean_plddt == pytest.approx(float(ca_b.mean()), abs=0.01)
        assert 0.0 < row.ptm < 1.0
    assert read_chain(out / "1vii_A.pdb").author_number[0] == 41


def test_reloaded_adapter_reproduces_the_in_memory_model(trained_run):
    run, ds, splits, _, trained = trained_run
    model = load_run_model(run)
    targets = targets_from_dataset(ds, splits, "test")
    reloaded = fold(model, targets[:1])[0][0].atom37_positions
    in_memory = fold(trained.eval(), targets[:1])[0][0].atom37_positions
    np.testing.assert_array_equal(reloaded, in_memory)
    # the same weights through a different path: merged adapter
    merged = fold(load_run_model(run, merged=True), targets[:1])[0][0].atom37_positions
    np.testing.assert_allclose(merged, reloaded, atol=1e-3)
    # and the weights really are the trained ones: a fresh adapter-less base differs
    from pipeline.predict import load_base_model
    import yaml

    base = load_base_model(yaml.safe_load((run / "config.yaml").read_text())).eval()
    assert not np.allclose(fold(base, targets[:1])[0][0].atom37_positions, reloaded, atol=1e-3)


def test_training_state_matches_saved_adapter(trained_run):
    run = trained_run[0]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    model = load_run_model(run)
    params = dict(model.named_parameters())
    for key, value in ckpt["state_dict"].items():
        name = key.removeprefix("model.")
        if name in params:
            assert torch.equal(params[name].detach(), value), name


def test_batched_prediction_equals_single(trained_run):
    run, ds, splits = trained_run[:3]
    model = load_run_model(run)
    targets = targets_from_dataset(ds, splits, "test")
    together = fold(model, targets)
    alone = [fold(model, [t])[0] for t in targets]
    for (a, pa), (b, pb) in zip(together, alone):
        np.testing.assert_allclose(a.atom37_positions, b.atom37_positions, atol=1e-3)
        assert pa == pytest.approx(pb, abs=1e-4)  # pTM per chain, not a max over the batch


def test_fasta_input_and_ideal_helix_baseline(trained_run, tmp_path):
    run, ds = trained_run[:2]
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">q1 test\nMKTAYIAKQR\n>q2\nGSHM\n")
    assert main(["predict", "--run", str(run), "--fasta", str(fasta), "--out", str(tmp_path / "f"),
                 "--no-progress"]) == 0
    chain = read_chain(tmp_path / "f" / "q1.pdb")
    assert chain.sequence == "MKTAYIAKQR" and chain.author_number.tolist() == list(range(1, 11))
    assert main(["predict", "--baseline", "ideal-helix", "--dataset", str(ds), "--out", str(tmp_path / "h"),
                 "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "h" / "predictions.csv")
    assert (table["mean_plddt"] == 0).all() and len(table) == 3
    helix = read_chain(tmp_path / "h" / "1vii_A.pdb")
    assert helix.author_number[0] == 41
    ca = helix.atom37_positions[:, 1]
    rise = np.linalg.norm(ca[4] - ca[0])  # i -> i+4 CA distance in an alpha helix is ~6.2 Å
    assert 5.5 < rise < 7.0


def test_predict_errors_name_the_input(tmp_path, trained_run):
    run, ds = trained_run[:2]
    assert main(["predict", "--run", str(tmp_path / "nope"), "--dataset", str(ds), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    bad = tmp_path / "bad.fasta"
    bad.write_text(">a\nMK:TT\n")
    assert main(["predict", "--run", str(run), "--fasta", str(bad), "--out", str(tmp_path / "o")]) == 2


def test_target_length():
    chain = read_chain(STRUCTURES / "1l2y.pdb")
    assert Target("1l2y_A", chain).length == 20
