"""Predict -> score on gapped natives (issue 11): the full deposited sequence is folded, the PDB is numbered so
that residues match the native, and the scores equal the TMscore program's on the same pair."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data.chains import chain_path, load_chain
from data.structure import chain_to_pdb, read_chain
from pipeline import scoring
from pipeline.cli import main
from tests._train_helpers import make_dataset
from tests.test_metrics_tmscore import assert_agrees, needs_tmscore, run_tmscore

# 1bhl A: 151 deposited, a 16-residue internal gap; 1orc A: 71 deposited, termini missing, insertion codes 56A-E.
GAPPED = [("1bhl.pdb", "test"), ("1orc.pdb", "test")]


@pytest.fixture(scope="module")
def helix_predictions(tmp_path_factory):
    root = tmp_path_factory.mktemp("fullpred")
    dataset, _ = make_dataset(root / "dataset", GAPPED)
    for mode in ("full", "observed"):
        assert main(["predict", "--baseline", "ideal-helix", "--dataset", str(dataset), "--sequence", mode,
                     "--out", str(root / mode), "--no-progress"]) == 0
    return root, dataset


def test_predict_folds_the_full_sequence_by_default(helix_predictions):
    root, dataset = helix_predictions
    for chain_id in ("1bhl_A", "1orc_A"):
        native = load_chain(chain_path(dataset, chain_id))
        full = read_chain(root / "full" / f"{chain_id}.pdb")
        assert native.n_observed < len(native)
        assert full.sequence == native.sequence and full.n_observed == len(native)  # every position predicted
        assert full.sequence_source == "seqres" and full.residue_index.tolist() == list(range(len(native)))
        # the native's own numbering where it was observed
        seen = native.observed
        assert full.author_number[seen].tolist() == native.author_number[seen].tolist()
        assert full.insertion_code[seen].tolist() == native.insertion_code[seen].tolist()
        observed = read_chain(root / "observed" / f"{chain_id}.pdb")
        assert observed.sequence == native.observed_residues().sequence and observed.sequence_source == "observed"
    table = pd.read_csv(root / "full" / "predictions.csv")
    assert table.length.tolist() == [151, 71]


@needs_tmscore
@pytest.mark.parametrize("chain_id", ["1bhl_A", "1orc_A"])
def test_scores_equal_tmscore_on_a_gapped_native(helix_predictions, chain_id, tmp_path):
    root, dataset = helix_predictions
    native = load_chain(chain_path(dataset, chain_id))
    native_pdb = tmp_path / "native.pdb"
    native_pdb.write_text(chain_to_pdb(native))
    for mode in ("full", "observed"):
        model_pdb = root / mode / f"{chain_id}.pdb"
        theirs = run_tmscore(model_pdb, native_pdb)
        assert theirs["l_ref"] == native.n_observed  # TMscore normalises by the native's observed residues
        pair = scoring.score_pair(model_pdb, native_pdb)
        assert_agrees(pair, theirs, f"{chain_id} {mode} pair")
        against_dataset = scoring.score_chains(read_chain(model_pdb), native)
        assert_agrees(against_dataset, theirs, f"{chain_id} {mode} dataset")
        if mode == "full":  # both carry the deposited sequence: matched by index, same answer as by number
            assert scoring.resolve_align(read_chain(model_pdb), native, "auto") == "index"
            by_number = scoring.score_chains(read_chain(model_pdb), native, align="number")
            assert by_number["tm_score"] == pytest.approx(against_dataset["tm_score"], abs=1e-9)
    out = tmp_path / "scores.csv"
    assert main(["score", "--predictions", str(root / "full" / "predictions.csv"), "--dataset", str(dataset),
                 "--out", str(out), "--no-progress"]) == 0
    row = pd.read_csv(out).set_index("chain_id").loc[chain_id]
    theirs = run_tmscore(root / "full" / f"{chain_id}.pdb", native_pdb)
    assert row.l_ref == native.n_observed and row.n_aligned == theirs["n_aligned"]
    assert abs(row.tm_score - theirs["tm_score"]) <= 0.001


def test_index_matching_survives_a_numbering_that_cannot_be_written(helix_predictions, tmp_path):
    """A native whose author numbers repeat is written by deposited index (1..N) and still matches by index."""
    root, dataset = helix_predictions
    native = load_chain(chain_path(dataset, "1orc_A"))
    numbers = native.author_number.copy()
    numbers[10] = numbers[11]  # a duplicated author number (seen in real files)
    from dataclasses import replace

    from data.structure import numbering_is_unique
    from pipeline.baselines import ideal_helix_chain

    clashing = replace(native, author_number=numbers)
    assert not numbering_is_unique(clashing)
    path = tmp_path / "pred.pdb"
    helix = replace(ideal_helix_chain(clashing), observed=np.ones(len(native), dtype=bool))
    path.write_text(chain_to_pdb(helix, numbering="index"))
    model = read_chain(path)
    assert model.author_number.tolist() == list(range(1, len(native) + 1))
    result = scoring.score_chains(model, clashing)
    assert result["n_aligned"] == result["l_ref"] == native.n_observed
    with pytest.raises(ValueError, match="align: 'index' needs both chains"):
        scoring.match_residues(model.observed_residues(), clashing, align="index")
