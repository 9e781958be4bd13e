"""`foldtune score`: single pair (text / --json), batch CSV mode, workflow mode against a dataset."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from data.chains import save_chain
from data.structure import chain_to_pdb, read_chain
from pipeline import scoring
from pipeline.cli import main
from tests.shared_data import SHARED_STRUCTURES

SHARED = SHARED_STRUCTURES
MODEL, TARGET = SHARED / "7sgn_C_model.pdb", SHARED / "7sgn_C_target.pdb"


def test_single_pair_json_and_text(capsys):
    assert main(["score", str(MODEL), str(TARGET), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == list(scoring.METRIC_KEYS)
    assert result["n_aligned"] == 102 and result["l_ref"] == 108  # target residues 6-11 have no model
    assert result == pytest.approx(scoring.score_pair(MODEL, TARGET))
    # 6 of 108 reference residues missing: lDDT counts their pairs as not preserved
    assert 0.0 < result["lddt"] < result["lddt_ca"] < 1.0
    assert main(["score", str(MODEL), str(TARGET)]) == 0
    text = capsys.readouterr().out
    for label in ("TM-score", "GDT-TS", "GDT-HA", "RMSD", "lDDT", "lDDT-CA", "matched", "L_ref"):
        assert label in text
    assert f"{result['tm_score']:.4f}" in text


def test_errors_are_clear(tmp_path, capsys):
    assert main(["score", str(MODEL), str(tmp_path / "missing.pdb")]) == 1
    assert "missing.pdb" in capsys.readouterr().err
    assert main(["score", "--pairs", str(tmp_path / "p.csv")]) == 2  # --out missing


def test_batch_mode_writes_csv(tmp_path):
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame(
        {"id": ["sgn", "tii"], "model": [str(MODEL), str(SHARED / "1tii.pdb")],
         "ref": [str(TARGET), str(SHARED / "1tii.pdb")], "chain1": ["", "D"], "chain2": ["", "E"]}
    ).to_csv(pairs, index=False)
    out = tmp_path / "scores.csv"
    assert main(["score", "--pairs", str(pairs), "--out", str(out), "--no-progress"]) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["id", *scoring.METRIC_KEYS, "error"] and table.error.isna().all()
    assert table.loc[0, "tm_score"] == pytest.approx(scoring.score_pair(MODEL, TARGET)["tm_score"])
    expected = scoring.score_pair(SHARED / "1tii.pdb", SHARED / "1tii.pdb", chain1="D", chain2="E")
    assert table.loc[1, "gdt_ts"] == pytest.approx(expected["gdt_ts"]) and expected["tm_score"] > 0.9
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temp file


def test_workflow_mode_scores_predictions_against_dataset(tmp_path):
    native = read_chain(TARGET)
    dataset = tmp_path / "dataset"
    (dataset / "chains").mkdir(parents=True)
    save_chain(native, dataset / "chains" / "7sgn_C.npz")
    pd.DataFrame({"chain_id": ["7sgn_C"], "pdb_id": ["7SGN"], "chain": ["C"], "length": [len(native)],
                  "npz": ["chains/7sgn_C.npz"]}).to_csv(dataset / "manifest.csv", index=False)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    (pred_dir / "7sgn_C.pdb").write_text(chain_to_pdb(read_chain(MODEL)))
    pd.DataFrame({"chain_id": ["7sgn_C"], "pdb": ["7sgn_C.pdb"], "mean_plddt": [71.5], "ptm": [0.6],
                  "length": [102]}).to_csv(pred_dir / "predictions.csv", index=False)
    out = tmp_path / "scores.csv"
    code = main(["score", "--predictions", str(pred_dir / "predictions.csv"), "--dataset", str(dataset),
                 "--out", str(out), "--no-progress"])
    assert code == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["chain_id", *scoring.METRIC_KEYS, "mean_plddt", "error"]
    assert table.loc[0, "mean_plddt"] == 71.5
    expected = scoring.score_pair(MODEL, TARGET)
    for key in scoring.METRIC_KEYS:
        assert table.loc[0, key] == pytest.approx(expected[key], abs=1e-6), key


def test_batch_mode_parses_each_file_once(tmp_path, monkeypatch):
    """A reference shared by many rows is read once per score_table call; scores equal score_pair's."""
    calls = []
    real_read = scoring.read_chain

    def counting_read(path, chain=None, model=1):
        calls.append((str(path), chain))
        return real_read(path, chain=chain, model=model)

    monkeypatch.setattr(scoring, "read_chain", counting_read)
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({"id": ["a", "b", "c"], "model": [str(MODEL), str(TARGET), str(MODEL)],
                  "ref": [str(TARGET)] * 3}).to_csv(pairs, index=False)
    table = scoring.score_table(pairs, tmp_path / "scores.csv", show_progress=False)
    assert sorted(calls) == sorted([(str(MODEL), None), (str(TARGET), None)])
    monkeypatch.setattr(scoring, "read_chain", real_read)
    for row, model in zip(table.itertuples(), [MODEL, TARGET, MODEL]):
        expected = scoring.score_pair(model, TARGET)
        for key in scoring.METRIC_KEYS:
            assert getattr(row, key) == pytest.approx(expected[key], abs=1e-12), key
