"""The vectorised PDB reader (data.pdb_columns) against Biopython's path of data.structure, field by field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from data import pdb_columns, structure
from data.structure import chain_to_pdb, read_chains
from tests.shared_data import SHARED_STRUCTURES

PDB_FILES = sorted(p.name for p in SHARED_STRUCTURES.glob("*.pdb"))


def _takes_fast_path(text: str) -> bool:
    return pdb_columns.observed_chains(text, structure.MODIFIED_PARENT, structure.ATOM_RENAME,
                                       structure._ALLOWED_ATOMS, structure._UNKNOWN_ATOMS,
                                       structure._WATER) is not None


def assert_same_chains(fast: list, slow: list, label: str) -> None:
    assert len(fast) == len(slow), label
    for a, b in zip(fast, slow):
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if isinstance(y, np.ndarray):
                assert x.dtype == y.dtype and x.shape == y.shape, (label, field.name)
                np.testing.assert_array_equal(x, y, err_msg=f"{label}: {field.name}")
            else:
                assert x == y, (label, field.name, x, y)


@pytest.mark.parametrize("name", PDB_FILES)
def test_shared_pdb_files_read_the_same(name, tmp_path):
    """Every shared PDB file, and each of its chains written back by chain_to_pdb, reads as with Biopython."""
    path = SHARED_STRUCTURES / name
    slow = read_chains(path, plain_reader=False)
    assert_same_chains(read_chains(path), slow, name)
    for chain in slow[:2]:
        for numbering in ("author", "index"):
            try:
                text = chain_to_pdb(chain, numbering=numbering)
            except ValueError:
                continue  # does not fit a PDB file
            written = tmp_path / f"{chain.chain_id}_{numbering}.pdb"
            written.write_text(text)
            assert _takes_fast_path(text), (name, numbering)  # what foldtune writes is always a plain file
            assert_same_chains(read_chains(written), read_chains(written, plain_reader=False), f"{name} {numbering}")


def _atom(serial: int, name: str, resname: str, number: int, x: float, altloc: str = " ", record: str = "ATOM  ",
          element: str = "C", chain: str = "A") -> str:
    return (f"{record}{serial:5d} {name:<4}{altloc}{resname:>3} {chain}{number:4d}    {x:8.3f}{1.5:8.3f}{-2.25:8.3f}"
            f"{1.0:6.2f}{20.0:6.2f}          {element:>2}  ")


def _residue(start: int, number: int, resname: str = "GLY", **kw) -> list[str]:
    return [_atom(start + k, f" {n}", resname, number, 1.0 * number + k, **kw) for k, n in enumerate(("N", "CA", "C", "O"))]


@pytest.mark.parametrize("case", ["plain", "hetatm", "altloc", "split_residue", "split_chain", "two_models",
                                  "mse", "negative_and_blank_fields", "hydrogen", "unknown_residue"])
def test_edge_cases_fall_back_or_agree(case, tmp_path):
    """Shapes the reader declines go to Biopython; those it takes give Biopython's result."""
    lines = _residue(1, 1) + _residue(5, 2)
    declines = {"hetatm", "altloc", "split_residue", "split_chain", "two_models"}
    if case == "hetatm":
        lines.append(_atom(9, " O", "HOH", 100, 3.0, record="HETATM", element="O"))
    elif case == "altloc":
        lines[1] = _atom(2, " CA", "GLY", 1, 2.0, altloc="A")
    elif case == "split_residue":
        lines += [_atom(9, " CB", "GLY", 1, 3.0)]
    elif case == "split_chain":
        lines = _residue(1, 1) + _residue(5, 2, chain="B") + _residue(9, 3)
    elif case == "two_models":
        lines = ["MODEL        1"] + lines + ["ENDMDL", "MODEL        2"] + lines + ["ENDMDL"]
    elif case == "mse":
        lines += _residue(9, 3, resname="MSE") + [_atom(13, "SE", "MSE", 3, 4.0, element="SE")]
    elif case == "negative_and_blank_fields":
        lines = [line[:30] + f"{-0.5:8.3f}{-123.456:8.3f}{0.0:8.3f}" + line[54:] for line in lines]
    elif case == "hydrogen":
        lines.append(_atom(9, " HA2", "GLY", 2, 5.0, element="H"))
    elif case == "unknown_residue":
        lines += _residue(9, 3, resname="XYZ")
    text = "HEADER    TEST                                                  1ABC\n" + "\n".join(lines) + "\nEND\n"
    path = tmp_path / "case.pdb"
    path.write_text(text)
    assert _takes_fast_path(text) == (case not in declines), case
    assert_same_chains(read_chains(path), read_chains(path, plain_reader=False), case)
