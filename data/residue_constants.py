"""The residue facts the data layer needs, in AlphaFold2's conventions, without torch or transformers.

Values are those of AlphaFold2's (and OpenFold's) ``residue_constants``: the 20 amino acids in AF2's order
``ARNDCQEGHILKMFPSTWYV``, X = 20 for anything else, and the 37 heavy-atom slots of the atom37 layout. ``tests/test_data_full_length.py``
checks every table against ``transformers.models.esm.openfold_utils.residue_constants``, so the two can
never drift apart; ``pipeline/`` keeps using the transformers module for the geometry tables (rigid groups,
chi angles) that only training needs.
"""

from __future__ import annotations

# AF2 residue order (``restypes``); X (unknown) is index 20 = ``restype_num``.
restypes: list[str] = list("ARNDCQEGHILKMFPSTWYV")
restype_num: int = len(restypes)  # 20
restype_order: dict[str, int] = {letter: i for i, letter in enumerate(restypes)}
restypes_with_x: list[str] = restypes + ["X"]
restype_order_with_x: dict[str, int] = {letter: i for i, letter in enumerate(restypes_with_x)}

restype_1to3: dict[str, str] = {
    "A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU", "G": "GLY",
    "H": "HIS", "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE", "P": "PRO", "S": "SER",
    "T": "THR", "W": "TRP", "Y": "TYR", "V": "VAL",
}
restype_3to1: dict[str, str] = {three: one for one, three in restype_1to3.items()}

# The atom37 slots, in AF2's order: backbone N, CA, C, then CB, O, then side-chain atoms, OXT last.
atom_types: list[str] = [
    "N", "CA", "C", "CB", "O", "CG", "CG1", "CG2", "OG", "OG1", "SG", "CD", "CD1", "CD2", "ND1", "ND2",
    "OD1", "OD2", "SD", "CE", "CE1", "CE2", "CE3", "NE", "NE1", "NE2", "OE1", "OE2", "CH2", "NH1", "NH2",
    "OH", "CZ", "CZ2", "CZ3", "NZ", "OXT",
]
atom_order: dict[str, int] = {name: i for i, name in enumerate(atom_types)}
atom_type_num: int = len(atom_types)  # 37

_BACKBONE = ["N", "CA", "C", "O"]
# Heavy atoms of each standard residue (no OXT, no hydrogens): the backbone plus these side-chain atoms.
_SIDE_CHAINS: dict[str, list[str]] = {
    "ALA": ["CB"],
    "ARG": ["CB", "CG", "CD", "NE", "CZ", "NH1", "NH2"],
    "ASN": ["CB", "CG", "OD1", "ND2"],
    "ASP": ["CB", "CG", "OD1", "OD2"],
    "CYS": ["CB", "SG"],
    "GLN": ["CB", "CG", "CD", "OE1", "NE2"],
    "GLU": ["CB", "CG", "CD", "OE1", "OE2"],
    "GLY": [],
    "HIS": ["CB", "CG", "ND1", "CD2", "CE1", "NE2"],
    "ILE": ["CB", "CG1", "CG2", "CD1"],
    "LEU": ["CB", "CG", "CD1", "CD2"],
    "LYS": ["CB", "CG", "CD", "CE", "NZ"],
    "MET": ["CB", "CG", "SD", "CE"],
    "PHE": ["CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ"],
    "PRO": ["CB", "CG", "CD"],
    "SER": ["CB", "OG"],
    "THR": ["CB", "OG1", "CG2"],
    "TRP": ["CB", "CG", "CD1", "CD2", "NE1", "CE2", "CE3", "CZ2", "CZ3", "CH2"],
    "TYR": ["CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "OH"],
    "VAL": ["CB", "CG1", "CG2"],
}
residue_atoms: dict[str, list[str]] = {name: _BACKBONE + side for name, side in _SIDE_CHAINS.items()}
