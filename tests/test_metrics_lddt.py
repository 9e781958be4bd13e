"""lDDT: biotite 1.6 as oracle on 7W1F_B (model covers every reference atom), hand-computed cases, symmetry,
and the batched torch CA-lDDT used in training."""

from __future__ import annotations


import biotite.structure as struc
import numpy as np
import pytest
import torch
from transformers.models.esm.openfold_utils import residue_constants as rc

from data.structure import read_chain
from pipeline import metrics, scoring
from tests.shared_data import SHARED_STRUCTURES

SHARED = SHARED_STRUCTURES


def model_on_reference(model_name: str, ref_name: str):
    """(reference chain, model atom37 positions and mask laid out on the reference's residues)."""
    model = read_chain(SHARED / model_name)
    ref = read_chain(SHARED / ref_name)
    mi, ri = scoring.match_residues(model, ref)
    pred = np.zeros_like(ref.atom37_positions)
    pmask = np.zeros_like(ref.atom37_mask)
    pred[ri], pmask[ri] = model.atom37_positions[mi], model.atom37_mask[mi]
    return ref, pred, pmask


@pytest.fixture(scope="module")
def w1f():
    return model_on_reference("7w1f_B_model.pdb", "7w1f_B_target.pdb")


def _atom_array(positions: np.ndarray, mask: np.ndarray) -> struc.AtomArray:
    res, atom = np.nonzero(mask)
    array = struc.AtomArray(len(res))
    array.coord = positions[res, atom]
    array.res_id = res + 1
    array.chain_id[:] = "A"
    array.atom_name = np.array([rc.atom_types[a] for a in atom])
    return array


def test_all_atom_and_ca_match_biotite_on_7w1f(w1f):
    ref, pred, pmask = w1f
    covered = pmask * ref.atom37_mask
    assert covered.sum() == ref.atom37_mask.sum(), "oracle needs the model to cover every reference atom"
    expected_all = float(struc.lddt(_atom_array(ref.atom37_positions, ref.atom37_mask),
                                     _atom_array(pred, ref.atom37_mask)))
    ours_plain = metrics.lddt(pred, ref.atom37_positions, pmask, ref.atom37_mask)  # no symmetry resolution
    assert ours_plain == pytest.approx(expected_all, abs=0.002)
    ours_sym = metrics.lddt(pred, ref.atom37_positions, pmask, ref.atom37_mask, aatype=ref.aatype)
    assert expected_all < ours_sym <= expected_all + 0.03  # better naming can only help

    ca_mask = np.zeros_like(ref.atom37_mask)
    ca_mask[:, 1] = 1
    expected_ca = float(struc.lddt(_atom_array(ref.atom37_positions, ca_mask), _atom_array(pred, ca_mask)))
    assert metrics.lddt(pred, ref.atom37_positions, pmask, ref.atom37_mask, ca_only=True) == pytest.approx(
        expected_ca, abs=0.002)
    # per residue vs biotite's residue aggregation
    per_res = metrics.lddt(pred, ref.atom37_positions, pmask, ref.atom37_mask, ca_only=True, per_residue=True)
    expected_res = struc.lddt(_atom_array(ref.atom37_positions, ca_mask), _atom_array(pred, ca_mask),
                              aggregation="residue")
    np.testing.assert_allclose(per_res, expected_res, atol=1e-6)


def _line(n: int) -> np.ndarray:
    return np.stack([np.arange(n) * 3.8, np.zeros(n), np.zeros(n)], axis=1)


def test_hand_computed_moved_atom():
    """4 CA on a line, 3.8 A apart (6 pairs < 15 A). Residue 4 moved 0.75 A: its 3 pairs pass 1/2/4 A but
    not 0.5 A -> (3*4 + 3*3) / 24 = 0.875; residue 4: 9/12; residue 1: (4+4+3)/12."""
    ref = _line(4)
    pred = ref.copy()
    pred[3, 0] += 0.75
    ones = np.ones(4)
    assert metrics.lddt(pred, ref, ones, ones, ca_only=True) == pytest.approx(0.875)
    per_res = metrics.lddt(pred, ref, ones, ones, ca_only=True, per_residue=True)
    np.testing.assert_allclose(per_res, [11 / 12, 11 / 12, 11 / 12, 0.75])


def test_hand_computed_missing_residue_and_radius():
    ref = _line(4)
    present = np.array([1.0, 1.0, 1.0, 0.0])
    # residue 4 missing in the model: its 3 pairs fail every threshold -> 12/24
    assert metrics.lddt(ref, ref, present, np.ones(4), ca_only=True) == pytest.approx(0.5)
    # 6 residues: pairs (1,5) at 15.2 A and (1,6), (2,6) are beyond 15 A and are not counted at all
    far = _line(6)
    pred = far.copy()
    pred[0] += 40.0  # residue 1 far away: only its pairs within 15 A (to 2, 3, 4) fail
    n_pairs = 15 - 3  # 15 pairs minus three beyond the radius (3.8*4=15.2 > 15)
    assert metrics.lddt(pred, far, np.ones(6), np.ones(6), ca_only=True) == pytest.approx((n_pairs - 3) / n_pairs)


def test_symmetric_swap_scores_one_and_missing_atoms_fail():
    ref = read_chain(SHARED / "1ubi.pdb")
    asp = np.nonzero(ref.aatype == rc.restype_order["D"])[0][0]
    phe = np.nonzero(ref.aatype == rc.restype_order["F"])[0][0]
    pred = ref.atom37_positions.copy()
    for residue, pairs in ((asp, [("OD1", "OD2")]), (phe, [("CD1", "CD2"), ("CE1", "CE2")])):
        for a, b in pairs:
            ia, ib = rc.atom_order[a], rc.atom_order[b]
            pred[residue, [ia, ib]] = pred[residue, [ib, ia]]
    mask = ref.atom37_mask
    assert metrics.lddt(pred, ref.atom37_positions, mask, mask, aatype=ref.aatype) == pytest.approx(1.0)
    assert metrics.lddt(pred, ref.atom37_positions, mask, mask) < 1.0  # without renaming it is penalised
    per_res = metrics.lddt(pred, ref.atom37_positions, mask, mask, aatype=ref.aatype, per_residue=True)
    np.testing.assert_allclose(per_res, 1.0)
    # A residue missing from the model: pairs of its atoms fail, the rest pass.
    dropped = mask.copy()
    dropped[10] = 0
    partial = metrics.lddt(ref.atom37_positions, ref.atom37_positions, dropped, mask, aatype=ref.aatype,
                           per_residue=True)
    atoms = ref.atom37_positions[mask > 0]
    owner = np.nonzero(mask)[0]
    gap = np.linalg.norm(atoms[:, None] - ref.atom37_positions[10][mask[10] > 0][None], axis=-1).min(1)
    contacts = np.unique(owner[gap <= 15.0])
    untouched = np.setdiff1d(np.arange(len(ref)), contacts)
    assert partial[10] == 0.0 and len(untouched) > 20
    np.testing.assert_allclose(partial[untouched], 1.0)
    assert np.all(partial[np.setdiff1d(contacts, [10])] < 1.0)


def test_torch_lddt_ca_batch_matches_numpy_path(w1f):
    ref, pred, pmask = w1f
    ref_ca = torch.tensor(ref.atom37_positions[:, 1], dtype=torch.float64)
    pred_ca = torch.tensor(pred[:, 1], dtype=torch.float64)
    n = ref_ca.shape[0]
    crops = [(0, 200), (150, 400)]
    width = max(hi - lo for lo, hi in crops)
    batch_pred, batch_ref = torch.zeros(2, width, 3, dtype=torch.float64), torch.zeros(2, width, 3, dtype=torch.float64)
    batch_mask = torch.zeros(2, width)
    for b, (lo, hi) in enumerate(crops):
        batch_pred[b, : hi - lo], batch_ref[b, : hi - lo], batch_mask[b, : hi - lo] = pred_ca[lo:hi], ref_ca[lo:hi], 1
    batch_pred[0, 200:] = 1e3  # padding content must not matter
    scores = metrics.lddt_ca(batch_pred, batch_ref, batch_mask)
    per_res = metrics.lddt_ca(batch_pred, batch_ref, batch_mask, per_residue=True)
    assert scores.shape == (2,) and per_res.shape == (2, width)
    for b, (lo, hi) in enumerate(crops):
        ones = np.ones(hi - lo)
        expected = metrics.lddt(pred[lo:hi, 1], ref.atom37_positions[lo:hi, 1], ones, ones, ca_only=True)
        assert float(scores[b]) == pytest.approx(expected, abs=1e-6)
        expected_res = metrics.lddt(pred[lo:hi, 1], ref.atom37_positions[lo:hi, 1], ones, ones, ca_only=True,
                                    per_residue=True)
        np.testing.assert_allclose(per_res[b, : hi - lo].numpy(), expected_res, atol=1e-5)
    assert torch.all(per_res[0, 200:] == 0)
    assert n == 473
