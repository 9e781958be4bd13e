"""The ideal-helix baseline: helix geometry, numbering, atoms, and agreement with a real helix (TMscore oracle)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

import numpy as np
import pytest
from transformers.models.esm.openfold_utils import residue_constants as rc

from data.structure import chain_to_pdb, read_chain
from pipeline.baselines import ideal_helix_backbone, ideal_helix_chain, place_atom
from tests.shared_data import SHARED_STRUCTURES

STRUCTURES = SHARED_STRUCTURES
N, CA, C, O, CB = (rc.atom_order[a] for a in ("N", "CA", "C", "O", "CB"))


def _dihedral(p0, p1, p2, p3) -> float:
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / np.linalg.norm(b1)
    v, w = b0 - np.dot(b0, b1) * b1, b2 - np.dot(b2, b1) * b1
    return float(np.degrees(np.arctan2(np.dot(np.cross(b1, v), w), np.dot(v, w))))


def _chain_from_sequence(sequence: str, residue_index=None):
    length = len(sequence)
    aatype = np.array([rc.restype_order.get(a, 20) for a in sequence], dtype=np.int64)
    ri = np.arange(1, length + 1) if residue_index is None else np.asarray(residue_index)
    from data.structure import ProteinChain

    return ProteinChain(
        pdb_id="test", chain="A", model=1, sequence=sequence, aatype=aatype, residue_index=ri,
        insertion_code=np.array([""] * length), atom37_positions=np.zeros((length, 37, 3), np.float32),
        atom37_mask=np.zeros((length, 37), np.float32), b_factors=np.zeros((length, 37), np.float32),
    )


def _segment(chain, first: int, last: int):
    keep = (chain.author_number >= first) & (chain.author_number <= last)
    arrays = {k: getattr(chain, k)[keep] for k in
              ("aatype", "residue_index", "insertion_code", "atom37_positions", "atom37_mask", "b_factors",
               "observed", "author_number")}
    return dataclasses.replace(chain, sequence="".join(np.array(list(chain.sequence))[keep]), **arrays)


def test_place_atom_reproduces_bond_angle_and_torsion():
    a, b, c = np.array([0.0, 1.0, 0.3]), np.array([0.1, 0.0, 0.0]), np.array([1.5, 0.2, -0.1])
    d = place_atom(a, b, c, 1.33, 116.0, -47.0)
    assert np.linalg.norm(d - c) == pytest.approx(1.33, abs=1e-9)
    cos = np.dot(b - c, d - c) / (np.linalg.norm(b - c) * np.linalg.norm(d - c))
    assert np.degrees(np.arccos(cos)) == pytest.approx(116.0, abs=1e-6)
    assert _dihedral(a, b, c, d) == pytest.approx(-47.0, abs=1e-6)


def test_helix_geometry_matches_a_real_alpha_helix():
    chain = _chain_from_sequence("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEV")
    helix = ideal_helix_chain(chain)
    ca = helix.atom37_positions[:, CA].astype(np.float64)
    d1 = np.linalg.norm(ca[1:] - ca[:-1], axis=1)
    d3 = np.linalg.norm(ca[3:] - ca[:-3], axis=1)
    d4 = np.linalg.norm(ca[4:] - ca[:-4], axis=1)
    np.testing.assert_allclose(d1, 3.80, atol=0.03)
    assert np.all((d3 > 5.0) & (d3 < 5.4)), d3
    assert np.all((d4 > 6.0) & (d4 < 6.3)), d4
    # Right-handed: positive CA(i..i+3) virtual dihedral (~ +50 degrees in real helices).
    assert 40 < _dihedral(*ca[5:9]) < 60
    # 3.6 residues per turn, 1.5 Å rise: 18 residues = 5 turns = 27 Å along the axis, back on the same side.
    axis = ca[18] - ca[0]
    assert np.linalg.norm(axis) == pytest.approx(27.0, abs=0.5)
    # Backbone dihedrals are the ones asked for, and each C=O(i) points at N-H(i+4) (the helix H-bond).
    bb = helix.atom37_positions.astype(np.float64)
    assert _dihedral(bb[9, C], bb[10, N], bb[10, CA], bb[10, C]) == pytest.approx(-64.0, abs=1e-3)
    assert _dihedral(bb[10, N], bb[10, CA], bb[10, C], bb[11, N]) == pytest.approx(-43.0, abs=1e-3)
    assert 2.7 < np.linalg.norm(bb[10, O] - bb[14, N]) < 3.3


def test_atoms_masks_numbering_and_cb():
    chain = _chain_from_sequence("AGSGXW", residue_index=[-3, -2, -1, 5, 6, 6])
    helix = ideal_helix_chain(chain)
    np.testing.assert_array_equal(helix.residue_index, chain.residue_index)
    assert helix.sequence == chain.sequence and helix.atom37_positions.dtype == np.float32
    expected = {N, CA, C, O}
    for i, aa in enumerate(chain.sequence):
        present = set(np.flatnonzero(helix.atom37_mask[i]))
        assert present == (expected if aa == "G" else expected | {CB}), (aa, present)
    cb_dist = np.linalg.norm(helix.atom37_positions[:, CB] - helix.atom37_positions[:, CA], axis=1)
    np.testing.assert_allclose(cb_dist[chain.aatype != rc.restype_order["G"]], 1.53, atol=0.02)
    # The chain break (-1 -> 5: 5 missing residues) keeps its spacing: as far apart as residues 6 apart in a helix.
    ca = helix.atom37_positions[:, CA]
    ideal = ideal_helix_backbone(10)[:, 1]
    assert np.linalg.norm(ca[3] - ca[2]) == pytest.approx(np.linalg.norm(ideal[6] - ideal[0]), abs=1e-3)
    assert np.all(helix.b_factors == 0)


@pytest.mark.tmscore
@pytest.mark.skipif(shutil.which("TMscore") is None, reason="Debian TMscore not installed")
def test_tm_score_against_a_real_helix_is_high_and_against_a_folded_chain_low(tmp_path):
    native = read_chain(STRUCTURES / "7w1f_B_target.pdb", chain="B")
    segment = _segment(native, 76, 100)  # a 25-residue alpha-helix of 7W1F chain B
    assert len(segment.sequence) == 25

    def tmscore(model, reference) -> tuple[float, float]:
        (tmp_path / "model.pdb").write_text(chain_to_pdb(model))
        (tmp_path / "ref.pdb").write_text(chain_to_pdb(reference))
        out = subprocess.run(["TMscore", str(tmp_path / "model.pdb"), str(tmp_path / "ref.pdb")],
                             capture_output=True, text=True, check=True).stdout
        tm = float(re.search(r"^TM-score\s*=\s*([\d.]+)", out, re.M).group(1))
        rmsd = float(re.search(r"^RMSD of\s+the common residues=\s*([\d.]+)", out, re.M).group(1))
        return tm, rmsd

    tm, rmsd = tmscore(ideal_helix_chain(segment), segment)
    assert tm > 0.6 and rmsd < 1.0, (tm, rmsd)
    tm_whole, _ = tmscore(ideal_helix_chain(native), native)
    assert tm_whole < 0.3, tm_whole
