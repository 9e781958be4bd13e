"""TM-score / GDT / RMSD against Debian's `TMscore` (20190822) on real pairs, plus Kabsch and d0 checks.

Inputs for TMscore are clean single-chain PDB files written by data.structure.chain_to_pdb (ATOM records
only, MSE already MET, one altloc, one model), so TMscore and foldtune read exactly the same residues.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from data.structure import ProteinChain, chain_to_pdb, read_chain
from pipeline import metrics, scoring
from tests.shared_data import SHARED_STRUCTURES

SHARED = SHARED_STRUCTURES

TMSCORE = shutil.which("TMscore")
needs_tmscore = pytest.mark.skipif(
    TMSCORE is None,
    reason="!!! TMscore binary NOT FOUND - the TMscore agreement tests did NOT run "
    "(apt-get install tm-align; CI installs it) !!!",
)

# (model file, chain, model number), (reference file, chain, model number)
PAIRS = {
    "1tii_D_vs_E": (("1tii.pdb", "D", 1), ("1tii.pdb", "E", 1)),
    "4ake_A_vs_B": (("4ake.cif", "A", 1), ("4ake.cif", "B", 1)),
    "2axd_nmr_1_vs_2": (("2axd.pdb", None, 2), ("2axd.pdb", None, 1)),
    "1l2y_nmr_short_L20": (("1l2y.pdb", None, 2), ("1l2y.pdb", None, 1)),
    "7sgn_C_model_vs_target": (("7sgn_C_model.pdb", None, 1), ("7sgn_C_target.pdb", None, 1)),
    "7w1f_B_model_vs_target_gaps": (("7w1f_B_model.pdb", None, 1), ("7w1f_B_target.pdb", None, 1)),
    "1ake_A_vs_4ake_A_hinge": (("1ake_A.pdb", "A", 1), ("4ake.cif", "A", 1)),
    "2fzz_vs_2g00_insertion_codes": (("2fzz.pdb", "A", 1), ("2g00.pdb", "A", 1)),
    "2rbg_mse_A_vs_B": (("2rbg.pdb", "A", 1), ("2rbg.pdb", "B", 1)),
}


def run_tmscore(model: Path, ref: Path) -> dict:
    out = subprocess.run([TMSCORE, str(model), str(ref)], capture_output=True, text=True, check=True).stdout
    def grab(pattern: str) -> float:
        match = re.search(pattern, out)
        assert match, f"TMscore output lacks {pattern!r}:\n{out}"
        return float(match.group(1))
    return {
        "tm_score": grab(r"TM-score\s+=\s+([\d.]+)"),
        "gdt_ts": grab(r"GDT-TS-score=\s+([\d.]+)"),
        "gdt_ha": grab(r"GDT-HA-score=\s+([\d.]+)"),
        "rmsd": grab(r"RMSD of  the common residues=\s+([\d.]+)"),
        "n_aligned": int(grab(r"Number of residues in common=\s+(\d+)")),
        "l_ref": int(grab(r"Structure2: .*Length=\s+(\d+)")),
    }


def clean_file(tmp: Path, spec: tuple, tag: str) -> tuple[Path, ProteinChain]:
    name, chain, model = spec
    parsed = read_chain(SHARED / name, chain=chain, model=model)
    path = tmp / f"{tag}.pdb"
    path.write_text(chain_to_pdb(parsed))
    return path, parsed


def assert_agrees(ours: dict, theirs: dict, label: str) -> None:
    assert ours["n_aligned"] == theirs["n_aligned"], label
    assert ours["l_ref"] == theirs["l_ref"], label
    assert abs(ours["tm_score"] - theirs["tm_score"]) <= 0.001, (label, ours, theirs)
    assert abs(ours["gdt_ts"] - theirs["gdt_ts"]) <= 0.01, (label, ours, theirs)
    assert abs(ours["gdt_ha"] - theirs["gdt_ha"]) <= 0.01, (label, ours, theirs)
    assert abs(ours["rmsd"] - theirs["rmsd"]) <= 0.01, (label, ours, theirs)


@needs_tmscore
@pytest.mark.parametrize("label", list(PAIRS))
def test_matches_tmscore_on_real_pairs(label, tmp_path):
    model_spec, ref_spec = PAIRS[label]
    model_path, _ = clean_file(tmp_path, model_spec, "model")
    ref_path, ref = clean_file(tmp_path, ref_spec, "ref")
    ours = scoring.score_pair(model_path, ref_path)
    theirs = run_tmscore(model_path, ref_path)
    assert_agrees(ours, theirs, label)
    if label == "1l2y_nmr_short_L20":
        assert len(ref) == 20 and metrics.tm_d0(len(ref)) == 0.5


@needs_tmscore
def test_matches_tmscore_on_perturbed_peptides(tmp_path):
    """Short chains (10-16 residues; fewer than 4x4 seeds) with noise and a rigid motion."""
    rng = np.random.default_rng(7)
    peptide = read_chain(SHARED / "4zhl.cif", chain="P")  # 10 residues
    source = read_chain(SHARED / "1l2y.pdb")
    sixteen = ProteinChain(**{**source.__dict__})
    for key in ("aatype", "residue_index", "insertion_code", "atom37_positions", "atom37_mask", "b_factors",
                "observed", "author_number"):
        setattr(sixteen, key, getattr(source, key)[:16])
    sixteen.sequence = source.sequence[:16]
    for index, chain in enumerate([peptide, sixteen, peptide]):
        moved = ProteinChain(**{**chain.__dict__})
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        q *= np.sign(np.linalg.det(q))
        noisy = chain.atom37_positions @ q.T + rng.normal(scale=1.5 + index, size=chain.atom37_positions.shape)
        moved.atom37_positions = (noisy * chain.atom37_mask[..., None]).astype(np.float32)
        model_path, ref_path = tmp_path / f"m{index}.pdb", tmp_path / f"r{index}.pdb"
        model_path.write_text(chain_to_pdb(moved))
        ref_path.write_text(chain_to_pdb(chain))
        assert_agrees(scoring.score_pair(model_path, ref_path), run_tmscore(model_path, ref_path), f"peptide {index}")


@needs_tmscore
def test_sequence_alignment_matches_tmscore_on_renumbered_model(tmp_path):
    """align="sequence" on the US-align pair (numbering differs) == TMscore on the model renumbered by the
    same alignment (Debian TMscore 20190822 has no -seq option)."""
    model = read_chain(SHARED / "usalign_PDB1_model.pdb")
    ref = read_chain(SHARED / "usalign_PDB2.pdb")
    model_idx, ref_idx = scoring.match_residues(model, ref, align="sequence")
    assert len(model_idx) == 166  # the reference sequence is contained in the model's
    renumbered = ProteinChain(**{**model.__dict__})
    numbers = 5000 + np.arange(len(model), dtype=np.int64)  # unmatched residues get numbers REF lacks
    numbers[model_idx] = ref.author_number[ref_idx]
    renumbered.author_number = numbers
    model_path, ref_path = tmp_path / "model.pdb", tmp_path / "ref.pdb"
    model_path.write_text(chain_to_pdb(renumbered))
    ref_path.write_text(chain_to_pdb(ref))
    ours = scoring.score_chains(model, ref, align="sequence")
    assert_agrees(ours, run_tmscore(model_path, ref_path), "usalign -seq")
    by_number = scoring.score_chains(model, ref, align="number")
    assert by_number["tm_score"] < 0.3 < ours["tm_score"]  # wrong correspondence by number


def test_identity_scores_one():
    ref = read_chain(SHARED / "1ubi.pdb")
    result = scoring.score_chains(ref, ref)
    assert result["tm_score"] == pytest.approx(1.0, abs=1e-9)
    assert result["gdt_ts"] == result["gdt_ha"] == pytest.approx(1.0)
    assert result["rmsd"] == pytest.approx(0.0, abs=1e-4)
    assert result["lddt"] == result["lddt_ca"] == pytest.approx(1.0)
    assert result["n_aligned"] == result["l_ref"] == len(ref)


def test_no_common_residues_names_both_files(tmp_path):
    model = read_chain(SHARED / "1ubi.pdb")
    shifted = ProteinChain(**{**model.__dict__})
    shifted.author_number = model.author_number + 5000
    model_path, ref_path = tmp_path / "shifted_model.pdb", tmp_path / "native_ref.pdb"
    model_path.write_text(chain_to_pdb(shifted))
    ref_path.write_text(chain_to_pdb(model))
    # (by deposited index the two files, which share 1ubi's SEQRES, would match: align="auto" does that)
    with pytest.raises(ValueError, match=r"shifted_model\.pdb.*native_ref\.pdb.*no common residues"):
        scoring.score_pair(model_path, ref_path, align="number")


def test_single_kabsch_underreports_tm_score():
    """The search finds a better superposition than the all-residue Kabsch fit on a hinge motion."""
    model = read_chain(SHARED / "1ake_A.pdb")
    ref = read_chain(SHARED / "4ake.cif", chain="A")
    mi, ri = scoring.match_residues(model, ref)
    x, y = model.atom37_positions[mi, 1].astype(np.float64), ref.atom37_positions[ri, 1].astype(np.float64)
    rot, trans = metrics.kabsch(x, y)
    d = np.linalg.norm(metrics.superpose(x, rot, trans) - y, axis=-1)
    single = float(np.sum(1 / (1 + (d / metrics.tm_d0(len(ref))) ** 2)) / len(ref))
    assert metrics.tm_score(x, y, l_ref=len(ref))["tm_score"] > single + 0.05


def test_d0_and_seed_lengths():
    assert metrics.tm_d0(108) == pytest.approx(3.82, abs=0.01)
    assert metrics.tm_d0(473) == pytest.approx(7.76, abs=0.01)
    assert metrics.tm_d0(21) == metrics.tm_d0(10) == 0.5
    assert metrics._seed_lengths(300) == [300, 150, 75, 37, 18, 4]
    assert metrics._seed_lengths(20) == [20, 10, 5, 4]
    assert metrics._seed_lengths(3) == [3]


def test_kabsch_recovers_rotation_and_is_proper():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(5, 30, 3)) * 10
    q_rot = np.linalg.qr(rng.normal(size=(5, 3, 3)))[0]
    q_rot *= np.sign(np.linalg.det(q_rot))[:, None, None]
    shift = rng.normal(size=(5, 3)) * 5
    q = p @ np.swapaxes(q_rot, -1, -2) + shift[:, None]
    rot, trans = metrics.kabsch(p, q)
    np.testing.assert_allclose(rot, q_rot, atol=1e-9)
    np.testing.assert_allclose(trans, shift, atol=1e-8)
    # A mirror image: the best *proper* rotation, never a reflection.
    rot_m, _ = metrics.kabsch(p[0], p[0] * np.array([1, 1, -1]))
    assert np.linalg.det(rot_m) == pytest.approx(1.0)
    # Weights: rows with weight 0 do not influence the fit.
    noisy = q[0].copy()
    noisy[:5] += 50.0
    weights = np.r_[np.zeros(5), np.ones(25)]
    rot_w, trans_w = metrics.kabsch(p[0], noisy, weights)
    np.testing.assert_allclose(rot_w, q_rot[0], atol=1e-9)
    # torch in -> torch out, differentiable
    pt = torch.tensor(p[0], requires_grad=True)
    rot_t, trans_t = metrics.kabsch(pt, torch.tensor(q[0]))
    metrics.superpose(pt, rot_t, trans_t).sum().backward()
    assert isinstance(rot_t, torch.Tensor) and pt.grad is not None
    assert metrics.rmsd(p[0], q[0]) == pytest.approx(0.0, abs=1e-9)
