"""pipeline.features.make_ground_truth on real chains: frame convention, torsions, renaming, masks."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from transformers.models.esm.openfold_utils import (
    Rigid,
    frames_and_literature_positions_to_atom14_pos,
    residue_constants as rc,
    torsion_angles_to_frames,
)

from data.structure import read_chain
from pipeline.features import make_ground_truth, rigid_from_3_points
from tests.shared_data import SHARED_STRUCTURES

SHARED = SHARED_STRUCTURES
CHAINS = ["1ubi.pdb", "1a8o.pdb", "2rbg.pdb", "1ejg.pdb"]  # plain, MSE, MSE + 124 res, 0.54 Å with altlocs
A = rc.atom_order


@functools.lru_cache(maxsize=None)
def chain_tensors(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chain = read_chain(SHARED / name)
    return (
        torch.as_tensor(chain.aatype)[None],
        torch.as_tensor(chain.atom37_positions)[None],
        torch.as_tensor(chain.atom37_mask)[None],
    )


@functools.lru_cache(maxsize=None)
def truth(name: str) -> dict[str, torch.Tensor]:
    return make_ground_truth(*chain_tensors(name))


def dihedral(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray) -> float:
    """IUPAC dihedral (radians), textbook formula, independent of the code under test."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / np.linalg.norm(b1)
    v = b0 - np.dot(b0, b1) * b1
    w = b2 - np.dot(b2, b1) * b1
    return float(np.arctan2(np.dot(np.cross(b1, v), w), np.dot(v, w)))


def rotation_degrees(frames_a: torch.Tensor, frames_b: torch.Tensor) -> torch.Tensor:
    """Angle of the rotation taking frame a to frame b, (..., 4, 4) -> (...)."""
    rel = frames_a[..., :3, :3].transpose(-1, -2) @ frames_b[..., :3, :3]
    return torch.rad2deg(torch.arccos(((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)))


def angle_diff(a: float, b: float) -> float:
    return abs((a - b + np.pi) % (2 * np.pi) - np.pi)


def test_rigid_from_3_points_is_alg21_on_a_hand_case():
    n, ca, c = torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[4.0, 1.0, 1.0]])
    rot, trans = rigid_from_3_points(n - torch.tensor([[1.0, 0.0, 0.0]]), ca, c)
    # x along CA->C = +x; N - CA = (-2, 1, -1) minus its x part -> (0, 1, -1)/sqrt2; z = x × y.
    s = 2**-0.5
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.0, s, s], [0.0, -s, s]])
    assert torch.allclose(rot[0], expected, atol=1e-6)
    assert torch.equal(trans, ca)


@pytest.mark.parametrize("name", CHAINS)
def test_backbone_frames_place_literature_atoms_and_are_rotations(name):
    """ESMFold builds N, CA, C as frame @ literature positions, so the truth must satisfy that too."""
    aatype, pos, mask = chain_tensors(name)
    gt = truth(name)
    frames = Rigid.from_tensor_4x4(gt["backbone_frames"])
    lit = torch.as_tensor(rc.restype_atom14_rigid_group_positions, dtype=torch.float32)[aatype][..., :3, :]
    placed = frames[..., None].apply(lit)
    ok = gt["backbone_rigid_mask"].bool()
    err = (placed - pos[..., [A["N"], A["CA"], A["C"]], :]).norm(dim=-1)[ok]
    assert err[:, 1].max() < 1e-4  # CA is the origin
    assert err[:, 2].max() < 0.15  # C on +x, off by the bond-length deviation only
    assert err[:, 0].median() < 0.1 and err[:, 0].max() < 0.5  # N: ideal vs real N-CA-C angle
    rot = gt["rigidgroups_gt_frames"][..., :3, :3][gt["rigidgroups_gt_exists"].bool()]
    eye = torch.eye(3).expand_as(rot)
    assert torch.allclose(rot.transpose(-1, -2) @ rot, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(rot.shape[0]), atol=1e-5)


@pytest.mark.parametrize("name", CHAINS[:2])
def test_torsion_angles_match_textbook_dihedrals(name):
    aatype, pos, _ = chain_tensors(name)
    gt = truth(name)
    angles = torch.atan2(gt["torsion_angles_sin_cos"][0, ..., 0], gt["torsion_angles_sin_cos"][0, ..., 1]).numpy()
    p = pos[0].double().numpy()
    mask = gt["torsion_angles_mask"][0].numpy()
    checked = 0
    for i in range(1, p.shape[0]):
        if mask[i, 1]:
            assert angle_diff(angles[i, 1], dihedral(p[i - 1, A["C"]], p[i, A["N"]], p[i, A["CA"]], p[i, A["C"]])) < 1e-4
        if mask[i, 2]:  # psi through O, shifted by pi
            psi_o = dihedral(p[i, A["N"]], p[i, A["CA"]], p[i, A["C"]], p[i, A["O"]])
            assert angle_diff(angles[i, 2], psi_o + np.pi) < 1e-4
        resname = rc.restype_1to3.get(rc.restypes_with_x[int(aatype[0, i])], "UNK")
        for k, names in enumerate(rc.chi_angles_atoms.get(resname, [])):
            if mask[i, 3 + k]:
                assert angle_diff(angles[i, 3 + k], dihedral(*[p[i, A[n]] for n in names])) < 1e-4
                checked += 1
    assert checked > 50
    sin_cos = gt["alt_chi_angles_sin_cos"] * gt["chi_mask"][..., None]
    periodic = torch.as_tensor(rc.chi_pi_periodic)[aatype]
    assert torch.allclose(sin_cos, gt["chi_angles_sin_cos"] * (1 - 2 * periodic)[..., None])


@pytest.mark.parametrize("name", CHAINS)
def test_esmfold_geometry_rebuilds_the_chain_from_truth_frames_and_torsions(name):
    """HF ESMFold's own torsion_angles_to_frames + literature positions, fed the ground-truth backbone
    frames and torsions, must rebuild the real atoms (up to ideal vs real bond geometry)."""
    aatype, _, _ = chain_tensors(name)
    gt = truth(name)
    default = torch.as_tensor(rc.restype_rigid_group_default_frame)
    frames = torsion_angles_to_frames(
        Rigid.from_tensor_4x4(gt["backbone_frames"]), gt["torsion_angles_sin_cos"], aatype, default
    )
    atoms = frames_and_literature_positions_to_atom14_pos(
        frames, aatype, default, torch.as_tensor(rc.restype_atom14_to_rigid_group),
        torch.as_tensor(rc.restype_atom14_mask), torch.as_tensor(rc.restype_atom14_rigid_group_positions),
    )
    observed = gt["atom14_gt_exists"].bool() & gt["rigidgroups_gt_exists"][..., 4:5].bool().expand_as(gt["atom14_gt_exists"])
    err = (atoms - gt["atom14_gt_positions"]).norm(dim=-1)[observed]
    assert err.pow(2).mean().sqrt() < 0.35
    # The rebuilt chi frames coincide with the ground-truth rigid-group frames (same axes, same origin).
    degrees = rotation_degrees(frames.to_tensor_4x4(), gt["rigidgroups_gt_frames"])[gt["rigidgroups_gt_exists"].bool()]
    assert degrees.median() < 5.0 and degrees.max() < 30.0  # a wrong axis convention gives 90-180


def swap_symmetric_atoms37(aatype: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor):
    pos, mask = pos.clone(), mask.clone()
    for resname, pairs in rc.residue_atom_renaming_swaps.items():
        rows = aatype[0] == rc.restype_order[rc.restype_3to1[resname]]
        for a, b in pairs.items():
            ia, ib = A[a], A[b]
            pos[0, rows, ia], pos[0, rows, ib] = pos[0, rows, ib].clone(), pos[0, rows, ia].clone()
            mask[0, rows, ia], mask[0, rows, ib] = mask[0, rows, ib].clone(), mask[0, rows, ia].clone()
    return pos, mask


@pytest.mark.parametrize("name", ["1ubi.pdb", "2rbg.pdb"])
def test_alternative_truth_is_the_truth_of_the_renamed_chain(name):
    aatype, pos, mask = chain_tensors(name)
    gt = truth(name)
    swapped = make_ground_truth(aatype, *swap_symmetric_atoms37(aatype, pos, mask))
    assert gt["atom14_atom_is_ambiguous"].sum() > 0
    assert torch.equal(swapped["atom14_gt_positions"], gt["atom14_alt_gt_positions"])
    assert torch.equal(swapped["atom14_gt_exists"], gt["atom14_alt_gt_exists"])
    # Renaming OD1/OD2 (etc.) turns the last chi frame by pi about its x axis: alt frames = renamed frames.
    amb = gt["rigidgroups_group_is_ambiguous"].bool() & gt["rigidgroups_gt_exists"].bool()
    assert amb.sum() >= 5
    assert rotation_degrees(swapped["rigidgroups_gt_frames"], gt["rigidgroups_alt_gt_frames"])[amb].max() < 10.0
    assert rotation_degrees(swapped["rigidgroups_gt_frames"], gt["rigidgroups_gt_frames"])[amb].min() > 170.0
    assert torch.equal(swapped["rigidgroups_gt_frames"][..., :3, 3], gt["rigidgroups_alt_gt_frames"][..., :3, 3])
    # and the pi-periodic chi moves by pi (up to the few degrees real side chains are non-planar)
    periodic = torch.as_tensor(rc.chi_pi_periodic)[aatype].bool() & gt["chi_mask"].bool()
    renamed_chi = swapped["chi_angles_sin_cos"][periodic]
    assert (renamed_chi - gt["alt_chi_angles_sin_cos"][periodic]).norm(dim=-1).max() < 0.15  # < 9 degrees
    assert (renamed_chi - gt["chi_angles_sin_cos"][periodic]).norm(dim=-1).min() > 1.95  # > 155 degrees


def test_padding_missing_atoms_and_degenerate_input_never_give_nan():
    aatype, pos, mask = chain_tensors("1ubi.pdb")
    short = 30
    batch_aatype = torch.zeros(2, aatype.shape[1], dtype=torch.long)
    batch_pos = torch.randn(2, aatype.shape[1], 37, 3) * 50  # garbage in the padding
    batch_mask = torch.ones(2, aatype.shape[1], 37)  # claims atoms exist in the padding
    batch_aatype[0], batch_pos[0], batch_mask[0] = aatype[0], pos[0], mask[0]
    batch_aatype[1, :short], batch_pos[1, :short], batch_mask[1, :short] = aatype[0, :short], pos[0, :short], mask[0, :short]
    residue_mask = torch.zeros(2, aatype.shape[1])
    residue_mask[0] = 1
    residue_mask[1, :short] = 1
    batch_mask[1, 5] = 0.0  # residue 5 of the second chain lost every atom
    gt = make_ground_truth(batch_aatype, batch_pos, batch_mask, residue_mask=residue_mask)
    single = make_ground_truth(aatype[:, :short], pos[:, :short], mask[:, :short])
    for key, value in gt.items():
        assert torch.isfinite(value.float()).all(), key
    for key in ("backbone_rigid_mask", "atom14_gt_exists", "rigidgroups_gt_exists", "torsion_angles_mask", "pseudo_beta_mask"):
        assert gt[key][1, short:].sum() == 0, key
        assert gt[key][1, 5].sum() == 0, key
        keep = [i for i in range(short) if i not in (4, 5, 6)]  # residue 5 also breaks its neighbours' torsions
        assert torch.equal(gt[key][1, keep], single[key][0, keep]), key
    assert torch.equal(gt["backbone_frames"][1, 5], torch.eye(4))  # masked frames are the identity
    assert torch.equal(gt["atom14_gt_positions"][0], truth("1ubi.pdb")["atom14_gt_positions"][0])
    zero = make_ground_truth(aatype[:, :3], torch.zeros(1, 3, 37, 3), torch.zeros(1, 3, 37))
    assert all(torch.isfinite(v.float()).all() for v in zero.values())
    assert zero["backbone_rigid_mask"].sum() == 0


def test_chain_break_masks_phi_and_pre_omega_but_not_psi():
    aatype, pos, mask = chain_tensors("1ubi.pdb")
    moved = pos.clone()
    moved[:, 10:] += torch.tensor([30.0, 0.0, 0.0])  # residue 10 is now far from residue 9
    gt = make_ground_truth(aatype, moved, mask)
    assert gt["torsion_angles_mask"][0, 10, :2].sum() == 0
    assert gt["torsion_angles_mask"][0, 11, :2].sum() == 2
    assert gt["torsion_angles_mask"][0, 10, 2] == 1


def test_pseudo_beta_is_cb_or_ca_for_glycine():
    aatype, pos, mask = chain_tensors("1ubi.pdb")
    gt = truth("1ubi.pdb")
    gly = aatype[0] == rc.restype_order["G"]
    assert gly.any()
    assert torch.equal(gt["pseudo_beta"][0, gly], pos[0, gly, A["CA"]])
    assert torch.equal(gt["pseudo_beta"][0, ~gly], pos[0, ~gly, A["CB"]])


def test_bad_input_names_the_field():
    aatype, pos, mask = chain_tensors("1ubi.pdb")
    with pytest.raises(ValueError, match="atom37_positions"):
        make_ground_truth(aatype, pos[..., :14, :], mask)
    with pytest.raises(ValueError, match="atom37_mask"):
        make_ground_truth(aatype, pos, mask[0])
    with pytest.raises(ValueError, match="aatype"):
        make_ground_truth(aatype + 21, pos, mask)
    with pytest.raises(ValueError, match="aatype"):
        make_ground_truth(aatype.float(), pos, mask)
