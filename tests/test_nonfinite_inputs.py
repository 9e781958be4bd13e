"""NaN / ±inf coordinates: prepare masks the atoms and names the residue; training names the chain of every
skipped batch (stderr and summary.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pandas as pd
import yaml

from data.chains import load_chain, save_chain
from data.dataset import read_manifest
from pipeline.cli import main
from pipeline.config import resolve
from pipeline.train import StepBatchSampler
from tests._train_helpers import STRUCTURES, make_dataset


def nonfinite_pdb(path: Path, bad: dict[tuple[str, int], str]) -> Path:
    """1l2y.pdb with the coordinate of atom (name, residue number) replaced by `value` ("nan", "inf", "-inf")."""
    lines = []
    for line in (STRUCTURES / "1l2y.pdb").read_text().splitlines(True):
        key = (line[12:16].strip(), int(line[22:26])) if line.startswith("ATOM") else None
        if key in bad:
            line = line[:30] + f"{bad[key]:>8}" + line[38:]
        lines.append(line)
    path.write_text("".join(lines))
    return path


def test_prepare_masks_nonfinite_atoms_and_names_the_residue(tmp_path, capsys):
    source = nonfinite_pdb(tmp_path / "1l2y.pdb", {("CA", 5): "nan", ("CB", 7): "inf", ("N", 7): "-inf"})
    assert main(["prepare", "--in", str(source), "--out", str(tmp_path / "ds"), "--no-progress"]) == 0
    assert "3 atoms with non-finite coordinates masked" in capsys.readouterr().out
    errors = pd.read_csv(tmp_path / "ds" / "errors.csv", keep_default_na=False)
    assert errors.stage.tolist() == ["coordinates", "coordinates"]
    assert "chain A: residue 5 GLN: CA: non-finite" in errors.reason[0]
    assert "chain A: residue 7 LEU: N, CB: non-finite" in errors.reason[1]
    chain = load_chain(tmp_path / "ds" / "chains" / "1l2y_A.npz")
    assert np.isfinite(chain.atom37_positions).all()
    assert chain.atom37_mask[4, 1] == 0 and chain.atom37_mask[6, 0] == 0 and chain.atom37_mask[6, 3] == 0
    assert chain.atom37_mask[4, 0] == 1 and chain.atom37_mask[6, 1] == 1  # the residues' other atoms stay
    assert not chain.observed[4] and chain.observed[6] and read_manifest(tmp_path / "ds").n_observed[0] == 19
    # Every CA non-finite: nothing left to train on, the chain is rejected.
    (tmp_path / "allbad").mkdir()
    all_bad = nonfinite_pdb(tmp_path / "allbad" / "1l2y.pdb", {("CA", n): "nan" for n in range(1, 21)})
    assert main(["prepare", "--in", str(all_bad), "--out", str(tmp_path / "ds2"), "--no-progress"]) == 1
    errors = pd.read_csv(tmp_path / "ds2" / "errors.csv", keep_default_na=False)
    assert "no residue with a finite CA left" in errors.reason.iloc[-1]


def test_training_names_the_chain_of_every_skipped_batch(tmp_path, capsys):
    dataset, splits = make_dataset(tmp_path / "ds", [("1l2y.pdb", "train"), ("1vii.pdb", "train")])
    # A dataset written before prepare masked them (or by other tools): NaN CAs with mask 1 in 1vii_A.
    path = dataset / "chains" / "1vii_A.npz"
    chain = load_chain(path)
    chain.atom37_positions[:, 1] = np.nan
    save_chain(chain, path)
    cfg = resolve({"adapter": {"method": "lora", "rank": 2, "alpha": 4},
                   "data": {"dataset": str(dataset), "splits": str(splits), "crop_size": 16, "batch_size": 1,
                            "val_split": None},
                   "trainer": {"max_steps": 4, "lr": 3e-3, "warmup_steps": 0, "threads": 1, "max_bad_steps": 10},
                   "output_dir": str(tmp_path / "run")})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["nonfinite_chains"] == ["1vii_A"]
    # Every batch of 1vii_A among the 4 steps' batches (the sampler's order; train split order 1l2y_A, 1vii_A).
    batches = StepBatchSampler([20, 36], batch_size=1, seed=0).global_batches()
    expected = sum([index for _, index in next(batches)] == [1] for _ in range(4))
    assert summary["nonfinite_batches"] == expected >= 1
    assert "batch(es) skipped for a non-finite loss or gradient, chains: 1vii_A" in err


def test_predict_refuses_nan_adapter_weights_and_another_targets_set(tmp_path, capsys):
    """`foldtune predict --run`: a diverged run's NaN weights, and RUN/config.yaml naming other targets than the
    adapter, stop before folding with one line (not inside the model or TM-score)."""
    from safetensors.torch import load_file, save_file

    import adapters
    from tests._adapter_runs import make_run

    fasta = tmp_path / "x.fasta"
    fasta.write_text(">x\nMKTAYIAKQR\n")
    run = make_run(tmp_path, "run", {"method": "lora", "rank": 2, "targets": ["attn"], "part": "trunk"})
    weights = run / "adapter" / adapters.WEIGHTS_NAME
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(weights))
    args = ["predict", "--run", str(run), "--fasta", str(fasta), "--out", str(tmp_path / "p"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{weights}: {name}: 1 of" in err and "NaN/inf" in err and "Traceback" not in err
    other = make_run(tmp_path, "other", {"method": "lora", "rank": 2, "targets": ["attn"], "part": "trunk"})
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["adapter"]["targets"] = ["attn", "mlp"]
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    assert main([*args[:2], str(other), *args[3:]]) == 2
    assert "targets: ['attn'], but" in capsys.readouterr().err


def test_score_names_nonfinite_coordinates_and_batch_modes_score_the_other_rows(tmp_path, capsys):
    from pipeline import scoring

    good = STRUCTURES / "1l2y.pdb"
    bad = nonfinite_pdb(tmp_path / "bad.pdb", {("CA", 5): "nan", ("CA", 9): "inf"})
    assert main(["score", str(bad), str(good)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "LinAlgError" not in err
    assert f"{bad}: chain A: coordinates: non-finite (NaN/inf) at residue 5 GLN: CA (and 1 more residues)" in err
    # --pairs: the good rows are scored, the bad one gets an error, the exit code says so, the old table is gone.
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({"id": ["ok", "nan", "missing"], "model": [str(good), str(bad), str(tmp_path / "nope.pdb")],
                  "ref": [str(good), str(good), str(good)]}).to_csv(pairs, index=False)
    out = tmp_path / "scores.csv"
    out.write_text("id,tm_score\nstale,0.1\n")
    assert main(["score", "--pairs", str(pairs), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    table = pd.read_csv(out, keep_default_na=False)
    assert table.id.tolist() == ["ok", "nan", "missing"]
    assert float(table.tm_score[0]) == pytest.approx(scoring.score_pair(good, good)["tm_score"])
    assert table.error[0] == "" and "non-finite" in table.error[1] and "nope.pdb" in table.error[2]
    assert table.tm_score[1] == "" and "foldtune score: nan: " in err and "2 could not be scored" in err
    # --predictions: the same for a predicted PDB holding NaN.
    dataset, _ = make_dataset(tmp_path / "ds", [("1l2y.pdb", "test")])
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "ok.pdb").write_bytes(good.read_bytes())
    (pred / "bad.pdb").write_bytes(bad.read_bytes())
    pd.DataFrame({"chain_id": ["1l2y_A", "1l2y_A"], "pdb": ["ok.pdb", "bad.pdb"],
                  "mean_plddt": [50.0, 50.0]}).to_csv(pred / "predictions.csv", index=False)
    assert main(["score", "--predictions", str(pred / "predictions.csv"), "--dataset", str(dataset),
                 "--out", str(out), "--no-progress"]) == 1
    table = pd.read_csv(out, keep_default_na=False)
    assert table.error[0] == "" and float(table.tm_score[0]) > 0.99 and "non-finite" in table.error[1]
