"""Ground-truth features for the structure losses (AlphaFold2 supplement §1.8, §1.9).

`make_ground_truth` turns a batch of atom37 chains into everything `pipeline.losses` compares a
prediction with: backbone frames, atom14 positions with their symmetric renaming, the 8 rigid-group
frames per residue, torsion angles and pseudo-β atoms.

Frame convention (AF2 Alg. 21, the one ESMFold's structure module uses): a frame is a rotation `R`
(columns = the frame's x, y, z axes in global coordinates) and a translation `t` (its origin, Å);
it maps local to global coordinates, `x_global = R @ x_local + t`. The backbone frame has its origin
on CA, x along CA→C and N in the xy-plane with positive y — so the literature positions of
`residue_constants.rigid_group_atom_positions` (C at (1.526, 0, 0), N at (-0.525, 1.359, 0)) land on
the real atoms. Frames are returned as 4x4 homogeneous matrices (`Rigid.to_tensor_4x4` layout).

Missing atoms only switch masks off: frames built from missing atoms are replaced by the identity and
no output is NaN. Everything is computed in float64 (torsion angles are sensitive to rounding) and
returned in the dtype of `atom37_positions`.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.esm.openfold_utils import make_atom14_masks
from transformers.models.esm.openfold_utils import residue_constants as rc
from transformers.models.esm.openfold_utils.feats import pseudo_beta_fn

__all__ = ["make_ground_truth", "frames_from_axes", "rigid_from_3_points", "NUM_RIGID_GROUPS"]

NUM_RIGID_GROUPS = 8  # backbone, pre-omega, phi, psi, chi1..chi4
_NUM_RESTYPES = rc.restype_num + 1  # 20 amino acids + X
_UNK = rc.restype_num
_N, _CA, _C, _O = (rc.atom_order[a] for a in ("N", "CA", "C", "O"))
# A C(i-1)–N(i) peptide bond is 1.33 Å; longer means a chain break, where pre-omega and phi are undefined.
_MAX_PEPTIDE_BOND = 2.0


def _build_group_atom_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per restype and rigid group: the atom37 indices (x_start, x_end, origin, xy_point) that define
    the frame, whether the group exists, and whether it is the π-symmetric last chi group.

    The frame's x axis runs along the bond x_start→x_end, its origin is `origin` and `xy_point` lies in
    the xy-plane (positive y). This is openfold's `atom37_to_frames` definition written uniformly.
    """
    atoms = np.zeros((_NUM_RESTYPES, NUM_RIGID_GROUPS, 4), dtype=np.int64)
    exists = np.zeros((_NUM_RESTYPES, NUM_RIGID_GROUPS), dtype=np.float32)
    ambiguous = np.zeros((_NUM_RESTYPES, NUM_RIGID_GROUPS), dtype=np.float32)
    atoms[:, 0] = (_CA, _C, _CA, _N)  # backbone: Alg. 21 with (N, CA, C)
    atoms[:, 3] = (_CA, _C, _C, _O)  # psi group: origin C, x along CA→C, O in the xy-plane
    exists[:, 0] = exists[:, 3] = 1.0  # groups 1 and 2 (pre-omega, phi) have no atoms of their own
    for restype, letter in enumerate(rc.restypes):
        resname = rc.restype_1to3[letter]
        for chi, names in enumerate(rc.chi_angles_atoms[resname]):
            _, a1, a2, a3 = (rc.atom_order[n] for n in names)
            atoms[restype, 4 + chi] = (a1, a2, a2, a3)
            exists[restype, 4 + chi] = 1.0
        if resname in rc.residue_atom_renaming_swaps:
            ambiguous[restype, 3 + len(rc.chi_angles_atoms[resname])] = 1.0
    return atoms, exists, ambiguous


def _build_chi_atom_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(21, 4, 4) atom37 indices of the four atoms of each chi angle, (21, 4) chi exists, (21, 4) π-periodic."""
    atoms = np.zeros((_NUM_RESTYPES, 4, 4), dtype=np.int64)
    for restype, letter in enumerate(rc.restypes):
        for chi, names in enumerate(rc.chi_angles_atoms[rc.restype_1to3[letter]]):
            atoms[restype, chi] = [rc.atom_order[n] for n in names]
    exists = np.asarray(rc.chi_angles_mask + [[0.0] * 4], dtype=np.float32)
    pi_periodic = np.asarray(rc.chi_pi_periodic, dtype=np.float32)
    return atoms, exists, pi_periodic


_GROUP_ATOMS, _GROUP_EXISTS, _GROUP_AMBIGUOUS = _build_group_atom_table()
_CHI_ATOMS, _CHI_EXISTS, _CHI_PI_PERIODIC = _build_chi_atom_table()
_ATOM14_SWAP = np.asarray(rc.restype_atom14_ambiguous_atoms_swap_idx, dtype=np.int64)  # (21, 14)
_ATOM14_AMBIGUOUS = np.asarray(rc.restype_atom14_ambiguous_atoms, dtype=np.float32)  # (21, 14)


def _table(array: np.ndarray, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.as_tensor(array, device=like.device, dtype=dtype)


def _normalize(v: torch.Tensor, eps: float) -> torch.Tensor:
    return v / torch.sqrt(torch.sum(v * v, dim=-1, keepdim=True) + eps)


def frames_from_axes(
    origin: torch.Tensor, x_axis: torch.Tensor, xy_vector: torch.Tensor, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram–Schmidt frame (the core of AF2 Alg. 21).

    Args: origin, x_axis, xy_vector (..., 3): the frame origin, a vector along its x axis and a vector
    whose component orthogonal to x points along +y.
    Returns: rotation (..., 3, 3) with the unit axes as columns, translation (..., 3) = origin.
    Zero-length inputs give a zero (not NaN) rotation; callers mask such frames.
    """
    e1 = _normalize(x_axis, eps)
    e2 = _normalize(xy_vector - torch.sum(xy_vector * e1, dim=-1, keepdim=True) * e1, eps)
    e3 = torch.linalg.cross(e1, e2, dim=-1)
    return torch.stack([e1, e2, e3], dim=-1), origin


def rigid_from_3_points(
    x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """AF2 Alg. 21 rigidFrom3Points: origin x2, x axis along x2→x3, x1 in the xy-plane.

    The backbone frame is `rigid_from_3_points(N, CA, C)`. Shapes (..., 3) -> ((..., 3, 3), (..., 3)).
    """
    return frames_from_axes(x2, x3 - x2, x1 - x2, eps)


def _gather_atoms(atom37: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """atom37 (B, L, 37, *rest), index (B, L, *idx) into the atom axis -> (B, L, *idx, *rest)."""
    batch, length = atom37.shape[:2]
    rest = atom37.shape[3:]
    flat = index.reshape(batch, length, -1)
    flat = flat.view(batch, length, -1, *([1] * len(rest))).expand(batch, length, -1, *rest)
    return torch.gather(atom37, 2, flat).view(*index.shape, *rest)


def _to_4x4(rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    top = torch.cat([rot, trans[..., None]], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def _masked_frames(rot: torch.Tensor, trans: torch.Tensor, exists: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity wherever `exists` is 0, so no downstream op meets a degenerate frame."""
    keep = exists.bool()
    eye = torch.eye(3, dtype=rot.dtype, device=rot.device).expand_as(rot)
    return torch.where(keep[..., None, None], rot, eye), torch.where(keep[..., None], trans, torch.zeros_like(trans))


def _torsion_sin_cos(four_atoms: torch.Tensor) -> torch.Tensor:
    """Dihedral angle of atoms (..., 4, 3) as (sin, cos) (..., 2), following openfold's
    `atom37_to_torsion_angles`: frame at atom 2 with x along 1→2 and atom 0 in the xy-plane; the
    fourth atom's local (z, y) are (sin, cos). Equals the IUPAC dihedral (0,1,2,3)."""
    a0, a1, a2, a3 = four_atoms.unbind(dim=-2)
    rot, origin = frames_from_axes(a2, a2 - a1, a0 - a2)
    local = torch.einsum("...ji,...j->...i", rot, a3 - origin)  # R^T (a3 - origin)
    sin_cos = torch.stack([local[..., 2], local[..., 1]], dim=-1)
    return sin_cos / torch.sqrt(torch.sum(sin_cos**2, dim=-1, keepdim=True) + 1e-8)


def _check_inputs(aatype: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> None:
    if aatype.dim() != 2 or aatype.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"aatype: expected a (B, L) integer tensor, got {tuple(aatype.shape)} {aatype.dtype}")
    batch, length = aatype.shape
    if tuple(positions.shape) != (batch, length, rc.atom_type_num, 3):
        raise ValueError(f"atom37_positions: expected shape {(batch, length, 37, 3)}, got {tuple(positions.shape)}")
    if tuple(mask.shape) != (batch, length, rc.atom_type_num):
        raise ValueError(f"atom37_mask: expected shape {(batch, length, 37)}, got {tuple(mask.shape)}")
    if aatype.numel() and (int(aatype.min()) < 0 or int(aatype.max()) > _UNK):
        raise ValueError(f"aatype: values must be AF2 indices in [0, {_UNK}], got [{int(aatype.min())}, {int(aatype.max())}]")


@torch.no_grad()
def make_ground_truth(
    aatype: torch.Tensor,
    atom37_positions: torch.Tensor,
    atom37_mask: torch.Tensor,
    residue_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Ground-truth features of a batch of chains.

    Args:
        aatype: (B, L) long, AF2 order (X = 20).
        atom37_positions: (B, L, 37, 3) Å.
        atom37_mask: (B, L, 37), 1 = atom observed.
        residue_mask: optional (B, L), 1 = real residue (padding is switched off everywhere).

    Returns a dict (float tensors in the dtype of `atom37_positions`, masks 0/1):
        backbone_frames (B, L, 4, 4), backbone_rigid_mask (B, L)      -- rigid group 0 (Alg. 21 on N, CA, C)
        atom14_atom_exists (B, L, 14)                                  -- atom is part of the residue type
        residx_atom14_to_atom37 (B, L, 14) long
        atom14_gt_positions (B, L, 14, 3), atom14_gt_exists (B, L, 14)
        atom14_alt_gt_positions, atom14_alt_gt_exists                  -- symmetric atoms swapped (Alg. 26)
        atom14_atom_is_ambiguous (B, L, 14)
        rigidgroups_gt_frames (B, L, 8, 4, 4), rigidgroups_gt_exists (B, L, 8)
        rigidgroups_group_exists, rigidgroups_group_is_ambiguous (B, L, 8)
        rigidgroups_alt_gt_frames (B, L, 8, 4, 4)                      -- last chi of D/E/F/Y rotated by π about x
        torsion_angles_sin_cos, alt_torsion_angles_sin_cos (B, L, 7, 2), torsion_angles_mask (B, L, 7)
            -- order: pre-omega, phi, psi, chi1..chi4 (Alg. 24); alt adds π to π-periodic chis
        chi_angles_sin_cos, alt_chi_angles_sin_cos (B, L, 4, 2), chi_mask (B, L, 4)
        pseudo_beta (B, L, 3), pseudo_beta_mask (B, L)                 -- CB, or CA for glycine
        seq_mask (B, L)                                                -- residue_mask (ones if not given)

    Pre-omega and phi also need the previous residue's C within 2 Å of N (no chain break).
    """
    _check_inputs(aatype, atom37_positions, atom37_mask)
    out_dtype = atom37_positions.dtype if atom37_positions.is_floating_point() else torch.float32
    aatype = aatype.long()
    seq_mask = torch.ones_like(aatype, dtype=torch.float64) if residue_mask is None else residue_mask.double()
    mask37 = atom37_mask.double() * seq_mask[..., None]
    pos37 = atom37_positions.double() * mask37[..., None]

    # --- atom14 and its symmetric renaming (Alg. 26 inputs)
    idx14 = make_atom14_masks({"aatype": aatype})
    atom14_exists = idx14["atom14_atom_exists"].double() * seq_mask[..., None]
    to37 = idx14["residx_atom14_to_atom37"]
    gt_exists = atom14_exists * _gather_atoms(mask37, to37)
    gt_positions = _gather_atoms(pos37, to37) * gt_exists[..., None]
    swap = _table(_ATOM14_SWAP, aatype)[aatype]  # (B, L, 14)
    alt_positions = torch.gather(gt_positions, 2, swap[..., None].expand(-1, -1, -1, 3))
    alt_exists = torch.gather(gt_exists, 2, swap)
    is_ambiguous = _table(_ATOM14_AMBIGUOUS, aatype, torch.float64)[aatype]

    # --- the 8 rigid groups (openfold atom37_to_frames)
    group_atoms = _table(_GROUP_ATOMS, aatype)[aatype]  # (B, L, 8, 4)
    group_exists = _table(_GROUP_EXISTS, aatype, torch.float64)[aatype] * seq_mask[..., None]
    atoms_xyz = _gather_atoms(pos37, group_atoms)  # (B, L, 8, 4, 3)
    atoms_present = _gather_atoms(mask37, group_atoms).prod(dim=-1)  # (B, L, 8)
    frames_exist = group_exists * atoms_present
    x_start, x_end, origin, xy_point = atoms_xyz.unbind(dim=-2)
    rot, trans = frames_from_axes(origin, x_end - x_start, xy_point - origin)
    rot, trans = _masked_frames(rot, trans, frames_exist)
    group_ambiguous = _table(_GROUP_AMBIGUOUS, aatype, torch.float64)[aatype] * seq_mask[..., None]
    # Swapping the two symmetric atoms of the last chi group = rotating its frame by π about x.
    flip = torch.ones(3, dtype=rot.dtype, device=rot.device).expand(*group_ambiguous.shape, 3).clone()
    flip[..., 1:] = 1.0 - 2.0 * group_ambiguous[..., None]
    alt_rot = rot * flip[..., None, :]

    # --- torsion angles (Alg. 24 / openfold atom37_to_torsion_angles)
    prev_pos = torch.cat([torch.zeros_like(pos37[:, :1]), pos37[:, :-1]], dim=1)
    prev_mask = torch.cat([torch.zeros_like(mask37[:, :1]), mask37[:, :-1]], dim=1)
    bonded = (torch.linalg.vector_norm(pos37[..., _N, :] - prev_pos[..., _C, :], dim=-1) <= _MAX_PEPTIDE_BOND).double()
    pre_omega_xyz = torch.stack([prev_pos[..., _CA, :], prev_pos[..., _C, :], pos37[..., _N, :], pos37[..., _CA, :]], dim=-2)
    phi_xyz = torch.stack([prev_pos[..., _C, :], pos37[..., _N, :], pos37[..., _CA, :], pos37[..., _C, :]], dim=-2)
    psi_xyz = pos37[..., [_N, _CA, _C, _O], :]
    chi_atoms = _table(_CHI_ATOMS, aatype)[aatype]  # (B, L, 4, 4)
    chi_xyz = _gather_atoms(pos37, chi_atoms)  # (B, L, 4, 4, 3)
    torsion_xyz = torch.cat([pre_omega_xyz[:, :, None], phi_xyz[:, :, None], psi_xyz[:, :, None], chi_xyz], dim=2)
    chi_mask = _table(_CHI_EXISTS, aatype, torch.float64)[aatype] * _gather_atoms(mask37, chi_atoms).prod(dim=-1)
    torsion_mask = torch.cat(
        [
            (prev_mask[..., _CA] * prev_mask[..., _C] * mask37[..., _N] * mask37[..., _CA] * bonded)[..., None],
            (prev_mask[..., _C] * mask37[..., _N] * mask37[..., _CA] * mask37[..., _C] * bonded)[..., None],
            mask37[..., [_N, _CA, _C, _O]].prod(dim=-1)[..., None],
            chi_mask,
        ],
        dim=-1,
    )
    sin_cos = _torsion_sin_cos(torsion_xyz)
    # psi is measured with O, which sits opposite N(i+1): shift by π.
    sin_cos[..., 2, :] = -sin_cos[..., 2, :]
    sin_cos = sin_cos * torsion_mask[..., None]
    pi_periodic = _table(_CHI_PI_PERIODIC, aatype, torch.float64)[aatype]
    mirror = torch.cat([torch.ones_like(pi_periodic[..., :3]), 1.0 - 2.0 * pi_periodic], dim=-1)
    alt_sin_cos = sin_cos * mirror[..., None]

    pseudo_beta, pseudo_beta_mask = pseudo_beta_fn(aatype, pos37, mask37)

    frames = _to_4x4(rot, trans)
    features = {
        "backbone_frames": frames[:, :, 0],
        "backbone_rigid_mask": frames_exist[:, :, 0],
        "atom14_atom_exists": atom14_exists,
        "atom14_gt_positions": gt_positions,
        "atom14_gt_exists": gt_exists,
        "atom14_alt_gt_positions": alt_positions,
        "atom14_alt_gt_exists": alt_exists,
        "atom14_atom_is_ambiguous": is_ambiguous,
        "rigidgroups_gt_frames": frames,
        "rigidgroups_gt_exists": frames_exist,
        "rigidgroups_group_exists": group_exists,
        "rigidgroups_group_is_ambiguous": group_ambiguous,
        "rigidgroups_alt_gt_frames": _to_4x4(alt_rot, trans),
        "torsion_angles_sin_cos": sin_cos,
        "alt_torsion_angles_sin_cos": alt_sin_cos,
        "torsion_angles_mask": torsion_mask,
        "chi_angles_sin_cos": sin_cos[:, :, 3:],
        "alt_chi_angles_sin_cos": alt_sin_cos[:, :, 3:],
        "chi_mask": torsion_mask[:, :, 3:],
        "pseudo_beta": pseudo_beta * pseudo_beta_mask[..., None],
        "pseudo_beta_mask": pseudo_beta_mask,
        "seq_mask": seq_mask,
    }
    features = {key: value.to(out_dtype).contiguous() for key, value in features.items()}
    features["residx_atom14_to_atom37"] = to37
    return features
