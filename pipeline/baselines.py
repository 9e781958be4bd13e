"""Structure baselines that need no model: the floor every fine-tuned predictor has to beat.

``ideal_helix_chain`` folds any sequence into one ideal right-handed alpha-helix. At the scale of the demo's
small randomly initialised models this is a surprisingly strong baseline (TM ~ 0.2 on small globular chains),
so the report shows it next to the untuned base.
"""

from __future__ import annotations

import numpy as np
from transformers.models.esm.openfold_utils import residue_constants as rc

from data.structure import ProteinChain

# Alpha-helix backbone dihedrals (degrees), within a degree or two of the mean of high-resolution structures
# (-63.8, -41.1; Hovmoller et al. 2002, Acta Cryst D58:768). The pitch is set by phi + psi: with the bond
# geometry below, -107 gives 3.6 residues/turn, a 1.5 Å rise, CA(i)-CA(i+3) 5.2 Å and CA(i)-CA(i+4) 6.15 Å,
# as in real helices (Pauling's -57/-47 stretches i->i+4 to 6.4 Å with these bond angles).
HELIX_PHI = -64.0
HELIX_PSI = -43.0
OMEGA = 180.0
# Ideal backbone bond lengths (Å) and angles (degrees), Engh & Huber 1991.
BOND_N_CA, BOND_CA_C, BOND_C_N, BOND_C_O = 1.458, 1.525, 1.329, 1.231
ANGLE_N_CA_C, ANGLE_CA_C_N, ANGLE_C_N_CA, ANGLE_CA_C_O = 111.2, 116.2, 121.7, 120.5
# A chain break of k missing residues is rebuilt as k helix residues, capped so one huge numbering jump
# (author numbering sometimes leaps by 1000) does not build a kilometre of helix.
MAX_GAP = 50

_N, _CA, _C, _O, _CB = (rc.atom_order[name] for name in ("N", "CA", "C", "O", "CB"))
_GLY = rc.restype_order["G"]


def place_atom(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle_deg: float,
               torsion_deg: float) -> np.ndarray:
    """NeRF: the position of atom d given a, b, c, |cd| = bond, angle(b, c, d), dihedral(a, b, c, d).

    a, b, c: (3,) Å. Returns (3,) Å.
    """
    angle, torsion = np.deg2rad(angle_deg), np.deg2rad(torsion_deg)
    bc = (c - b) / np.linalg.norm(c - b)
    normal = np.cross(b - a, bc)
    normal /= np.linalg.norm(normal)
    in_plane = np.cross(normal, bc)
    local = np.array([-bond * np.cos(angle),
                      bond * np.sin(angle) * np.cos(torsion),
                      bond * np.sin(angle) * np.sin(torsion)])
    return c + local[0] * bc + local[1] * in_plane + local[2] * normal


def ideal_helix_backbone(length: int, phi: float = HELIX_PHI, psi: float = HELIX_PSI) -> np.ndarray:
    """Backbone of a chain with constant (phi, psi) and trans peptides: (length, 4, 3) Å for N, CA, C, O."""
    if length < 1:
        raise ValueError(f"helix length must be >= 1, got {length}")
    backbone = np.zeros((length, 4, 3), dtype=np.float64)
    # First residue: N at the origin, CA on +x, C in the xy-plane with the ideal N-CA-C angle.
    backbone[0, 0] = (0.0, 0.0, 0.0)
    backbone[0, 1] = (BOND_N_CA, 0.0, 0.0)
    theta = np.deg2rad(180.0 - ANGLE_N_CA_C)
    backbone[0, 2] = backbone[0, 1] + BOND_CA_C * np.array([np.cos(theta), np.sin(theta), 0.0])
    for i in range(1, length):
        n_prev, ca_prev, c_prev = backbone[i - 1, :3]
        n = place_atom(n_prev, ca_prev, c_prev, BOND_C_N, ANGLE_CA_C_N, psi)
        ca = place_atom(ca_prev, c_prev, n, BOND_N_CA, ANGLE_C_N_CA, OMEGA)
        c = place_atom(c_prev, n, ca, BOND_CA_C, ANGLE_N_CA_C, phi)
        backbone[i, :3] = (n, ca, c)
    for i in range(length):
        n, ca, c = backbone[i, :3]
        # The carbonyl O is trans to the next residue's N across the CA-C bond: dihedral N-CA-C-O = psi + 180.
        backbone[i, 3] = place_atom(n, ca, c, BOND_C_O, ANGLE_CA_C_O, psi + 180.0)
    return backbone


def _cb_positions(backbone: np.ndarray, aatype: np.ndarray) -> np.ndarray:
    """CB from each residue's ideal backbone-frame coordinates (AF2 rigid group 0). (L, 3) Å."""
    n, ca, c = backbone[:, 0], backbone[:, 1], backbone[:, 2]
    # AF2 backbone frame: origin CA, x-axis towards C, N in the xy-plane on the +y side.
    ex = (c - ca) / np.linalg.norm(c - ca, axis=-1, keepdims=True)
    ny = (n - ca) - np.sum((n - ca) * ex, axis=-1, keepdims=True) * ex
    ey = ny / np.linalg.norm(ny, axis=-1, keepdims=True)
    ez = np.cross(ex, ey)
    local = np.zeros((len(aatype), 3))
    for i, aa in enumerate(aatype):
        resname = rc.restype_1to3.get(rc.restypes[aa], "ALA") if aa < len(rc.restypes) else "ALA"
        for atom, group, xyz in rc.rigid_group_atom_positions[resname]:
            if atom == "CB" and group == 0:
                local[i] = xyz
    return ca + local[:, :1] * ex + local[:, 1:2] * ey + local[:, 2:3] * ez


def helix_offsets(residue_index: np.ndarray) -> np.ndarray:
    """Position of each residue along the helix: consecutive, with chain breaks kept (capped at MAX_GAP).

    Insertion codes and non-increasing numbering advance by one residue.
    """
    steps = np.diff(np.asarray(residue_index, dtype=np.int64))
    steps = np.clip(steps, 1, MAX_GAP)
    return np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)


def ideal_helix_chain(chain: ProteinChain) -> ProteinChain:
    """The chain's sequence as one ideal alpha-helix (N, CA, C, O; CB for non-Gly), same residue numbering.

    Positions follow ``residue_index`` (the deposited-sequence index of a full-length chain, so every
    residue is on the helix); where it jumps (a chain given without its missing residues) the missing ones are
    built and dropped so that the break keeps its spacing.
    B-factors (the pLDDT column of predictions) are 0: a baseline has no confidence.
    """
    length = len(chain.aatype)
    if length == 0:
        raise ValueError(f"{chain.source_file or chain.chain_id}: sequence: empty chain")
    offsets = helix_offsets(chain.residue_index)
    backbone = ideal_helix_backbone(int(offsets[-1]) + 1)[offsets]
    aatype = np.asarray(chain.aatype, dtype=np.int64)
    positions = np.zeros((length, rc.atom_type_num, 3), dtype=np.float32)
    mask = np.zeros((length, rc.atom_type_num), dtype=np.float32)
    for slot, atom in enumerate((_N, _CA, _C, _O)):
        positions[:, atom] = backbone[:, slot]
        mask[:, atom] = 1.0
    has_cb = aatype != _GLY
    positions[has_cb, _CB] = _cb_positions(backbone, aatype)[has_cb]
    mask[has_cb, _CB] = 1.0
    return ProteinChain(
        pdb_id=chain.pdb_id, chain=chain.chain, model=1, sequence=chain.sequence, aatype=aatype.copy(),
        residue_index=np.asarray(chain.residue_index).copy(), insertion_code=np.asarray(chain.insertion_code).copy(),
        atom37_positions=positions, atom37_mask=mask, b_factors=np.zeros_like(mask),
        method="ideal-helix baseline", resolution=None, release_date=None, source_file=chain.source_file,
        author_number=np.asarray(chain.author_number).copy(), sequence_source=chain.sequence_source,
    )
