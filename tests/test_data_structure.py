"""data.structure against the shared structure set: MANIFEST.csv, an independent PDB line scanner, quirks."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.structure import ATOM_ORDER, chain_to_pdb, read_chain, read_chains
from tests.shared_data import SHARED_STRUCTURES

SHARED = SHARED_STRUCTURES
MANIFEST = pd.read_csv(SHARED / "MANIFEST.csv", keep_default_na=False, dtype=str)
# 1ejg residue 22 is a Pro/Ser microheterogeneity; the manifest (gemmi) counts both conformers, we keep
# the higher-occupancy one (Pro, 0.6) so that every position has one residue.
MICROHETEROGENEITY = {("1ejg.pdb", "A"): (22, "S")}


def _manifest_chain_name(chain: str) -> str:
    return "" if chain == "(blank)" else chain


@pytest.fixture(scope="module")
def parsed() -> dict[str, dict[str, object]]:
    return {
        Path(f).name: {c.chain: c for c in read_chains(SHARED / Path(f).name)}
        for f in MANIFEST.file.unique()
    }


def test_every_shared_file_matches_manifest(parsed):
    for file_name, rows in MANIFEST.groupby(MANIFEST.file.map(lambda f: Path(f).name), sort=False):
        chains = parsed[file_name]
        assert list(chains) == [_manifest_chain_name(c) for c in rows.chain], file_name
        for row in rows.itertuples():
            chain = chains[_manifest_chain_name(row.chain)].observed_residues()
            expected_seq, expected_len = row.sequence, int(row.n_residues)
            if (file_name, row.chain) in MICROHETEROGENEITY:
                resnum, dropped = MICROHETEROGENEITY[(file_name, row.chain)]
                position = int(np.flatnonzero(chain.author_number == resnum)[0])
                expected_seq = expected_seq[: position + 1] + expected_seq[position + 2 :]
                assert row.sequence[position + 1] == dropped
                expected_len -= 1
            assert len(chain) == expected_len, (file_name, row.chain)
            assert chain.sequence == expected_seq, (file_name, row.chain)
            assert f"{chain.author_number[0]}{chain.insertion_code[0]}" == row.first_resnum
            assert f"{chain.author_number[-1]}{chain.insertion_code[-1]}" == row.last_resnum
            assert chain.atom37_mask[:, ATOM_ORDER["CA"]].all()
            assert chain.atom37_positions.shape == (len(chain), 37, 3)
            assert chain.atom37_positions.dtype == np.float32 and chain.aatype.dtype == np.int64
            if row.method != "not in file" and row.kind != "predicted model":
                assert chain.method == row.method
                assert chain.pdb_id == row.pdb_id
            if row.resolution_A:
                assert chain.resolution == pytest.approx(float(row.resolution_A))


def _scan_pdb_model1(path: Path) -> dict[tuple[str, int, str], dict[str, tuple[float, np.ndarray, float]]]:
    """Independent oracle: heavy atoms of model 1, highest occupancy per atom (first on ties)."""
    residues: dict = {}
    for line in path.read_text().splitlines():
        if line.startswith("ENDMDL"):
            break
        if not line.startswith(("ATOM  ", "HETATM")):
            continue
        element = line[76:78].strip() or line[12:16].strip()[0]
        if element in ("H", "D") or line[17:20].strip() == "HOH":
            continue
        key = (line[21], int(line[22:26]), line[26].strip())
        name = line[12:16].strip()
        occupancy = float(line[54:60])
        xyz = np.array([float(line[30:38]), float(line[38:46]), float(line[46:54])], np.float32)
        atoms = residues.setdefault(key, {})
        if name not in atoms or occupancy > atoms[name][0]:
            atoms[name] = (occupancy, xyz, float(line[60:66]))
    return residues


@pytest.mark.parametrize("file_name", ["1ejg.pdb", "1a8o.pdb", "1orc.pdb", "1l2y.pdb", "3o5r.pdb"])
def test_coordinates_match_line_scanner(file_name):
    """Positions, masks and B-factors of every atom37 atom equal the file's (altlocs: highest occupancy)."""
    oracle = _scan_pdb_model1(SHARED / file_name)
    n_checked = 0
    for full in read_chains(SHARED / file_name):
        chain = full.observed_residues()
        assert not full.atom37_mask[~full.observed].any()  # unobserved positions carry no atoms
        for i in range(len(chain)):
            atoms = oracle[(chain.chain or " ", int(chain.author_number[i]), str(chain.insertion_code[i]))]
            for name, index in ATOM_ORDER.items():
                source = "SE" if name == "SD" and "SE" in atoms else name
                if chain.atom37_mask[i, index]:
                    occupancy, xyz, bfac = atoms[source]
                    np.testing.assert_allclose(chain.atom37_positions[i, index], xyz, atol=1e-3)
                    assert chain.b_factors[i, index] == pytest.approx(bfac, abs=1e-2)
                    n_checked += 1
                elif not (file_name == "1ejg.pdb" and chain.author_number[i] in (22, 25)):  # Pro/Ser, Leu/Ile sites
                    assert source not in atoms or name == "OXT", (file_name, i, name)
    assert n_checked > 150


def test_mse_becomes_met_with_sd():
    chain = read_chain(SHARED / "1a8o.pdb").observed_residues()
    assert len(chain) == 70  # 66 ATOM residues + 4 MSE HETATMs
    assert chain.modified_residues == {"MSE": 4}
    mse_resnums = sorted({int(l[22:26]) for l in (SHARED / "1a8o.pdb").read_text().splitlines()
                          if l.startswith("HETATM") and l[17:20] == "MSE"})
    positions = [int(np.flatnonzero(chain.author_number == r)[0]) for r in mse_resnums]
    assert all(chain.sequence[p] == "M" for p in positions)
    assert chain.atom37_mask[positions, ATOM_ORDER["SD"]].all()
    assert chain.aatype[positions[0]] == 12  # AF2 order: M = 12


def test_cacodylated_cys_keeps_only_cys_atoms():
    chain = read_chain(SHARED / "1bhl.pdb").observed_residues()
    lines = [l for l in (SHARED / "1bhl.pdb").read_text().splitlines() if l.startswith("HETATM") and l[17:20] == "CAS"]
    resnums = sorted({int(l[22:26]) for l in lines if l[21] == "A"})
    assert chain.modified_residues == {"CAS": len(resnums)} and len(resnums) >= 1
    assert any(l[12:16].strip() == "AS" for l in lines)
    for resnum in resnums:
        position = int(np.flatnonzero(chain.author_number == resnum)[0])
        assert chain.sequence[position] == "C"
        present = {name for name, i in ATOM_ORDER.items() if chain.atom37_mask[position, i]}
        assert present <= {"N", "CA", "C", "O", "CB", "SG", "OXT"} and "SG" in present


def test_insertion_codes_kept_in_file_order():
    chain = read_chain(SHARED / "1gbt.cif")
    labels = [f"{n}{c}" for n, c in zip(chain.author_number, chain.insertion_code)]
    assert "184A" in labels and "188A" in labels and "221A" in labels
    assert labels.index("184A") == labels.index("184") + 1 and labels[labels.index("184A") + 1] == "185"
    assert len(set(labels)) == len(labels)
    orc = read_chain(SHARED / "1orc.pdb").observed_residues()
    assert sorted(set(orc.insertion_code.tolist()) - {""}) == ["A", "B", "C", "D", "E"]


def test_truncated_nmr_models():
    model1 = read_chain(SHARED / "2ofg.cif")
    assert (len(model1), model1.n_observed) == (111, 106)  # all models share the 111-residue deposited sequence
    assert model1.observed_residues().author_number[[0, -1]].tolist() == [6, 111]
    model2 = read_chain(SHARED / "2ofg.cif", model=2).observed_residues()
    model3 = read_chain(SHARED / "2ofg.cif", model=3).observed_residues()
    assert model2.author_number[[0, -1]].tolist() == [1, 76] and model2.model == 2
    assert model3.author_number[[0, -1]].tolist() == [6, 76]
    with pytest.raises(ValueError, match="2ofg.cif: model: model 4 requested, file has 3"):
        read_chain(SHARED / "2ofg.cif", model=4)


def test_header_stripped_and_blank_chain_files():
    wqa = read_chain(SHARED / "6wqa.cif")
    assert (wqa.pdb_id, wqa.method, wqa.resolution, wqa.release_date) == ("6WQA", None, None, None)
    ake = read_chain(SHARED / "1ake_A.pdb")
    assert (ake.pdb_id, ake.chain, ake.chain_id) == ("1AKE", "A", "1ake_A")
    model = read_chain(SHARED / "usalign_PDB1_model.pdb", chain="_")
    assert model.chain == "" and len(model) == 250 and model.chain_id == "usalign_pdb1_model__"
    # a model and its header-less target must not collide in a dataset
    assert read_chain(SHARED / "7sgn_C_model.pdb").chain_id != read_chain(SHARED / "7sgn_C_target.pdb").chain_id


def test_nucleic_acid_and_ligand_chains_dropped():
    assert [c.chain for c in read_chains(SHARED / "5ugo.pdb")] == ["A"]
    assert [c.chain for c in read_chains(SHARED / "3mht.pdb")] == ["A"]
    assert [c.chain for c in read_chains(SHARED / "2q2k.cif")] == ["A", "B"]
    with pytest.raises(ValueError, match="chain: no protein chain 'D'"):
        read_chain(SHARED / "5ugo.pdb", chain="D")


def test_metadata_from_headers():
    ubi = read_chain(SHARED / "1ubi.pdb")
    assert (ubi.pdb_id, ubi.method, ubi.resolution) == ("1UBI", "X-RAY DIFFRACTION", 1.8)
    assert ubi.release_date == "1994-05-31"  # REVDAT 1 (initial release)
    zee = read_chain(SHARED / "3zee.cif")
    assert (zee.method, zee.resolution) == ("ELECTRON MICROSCOPY", 6.1)
    assert zee.release_date and len(zee.release_date) == 10


def test_gzip_and_suffixless_copies_read_the_same(tmp_path):
    source = SHARED / "4zey.cif"
    gz = tmp_path / "4zey.cif.gz"
    gz.write_bytes(gzip.compress(source.read_bytes()))
    odd = tmp_path / "4zey.txt"
    shutil.copy(source, odd)
    reference = read_chain(source)
    for path in (gz, odd):
        other = read_chain(path)
        assert other.sequence == reference.sequence and other.pdb_id == "4ZEY"
        np.testing.assert_array_equal(other.atom37_positions, reference.atom37_positions)


@pytest.mark.parametrize("file_name,chain", [("1a8o.pdb", "A"), ("1gbt.cif", "A"), ("usalign_PDB1_model.pdb", ""),
                                             ("7sgn_C_model.pdb", "C"), ("1bhl.pdb", "A")])
def test_chain_to_pdb_round_trip(tmp_path, file_name, chain):
    original = read_chain(SHARED / file_name, chain=chain)
    path = tmp_path / file_name.replace(".cif", ".pdb")
    path.write_text(chain_to_pdb(original))
    back = read_chain(path)
    assert (back.sequence, back.chain, back.pdb_id) == (original.sequence, original.chain, original.pdb_id)
    assert back.sequence_source == ("observed" if original.sequence_source == "observed" else "seqres")
    np.testing.assert_array_equal(back.residue_index, original.residue_index)
    np.testing.assert_array_equal(back.observed, original.observed)
    seen = original.observed
    np.testing.assert_array_equal(back.author_number[seen], original.author_number[seen])
    np.testing.assert_array_equal(back.insertion_code[seen], original.insertion_code[seen])
    np.testing.assert_array_equal(back.atom37_mask, original.atom37_mask)
    np.testing.assert_allclose(back.atom37_positions, original.atom37_positions, atol=6e-4)
    np.testing.assert_allclose(back.b_factors, original.b_factors, atol=6e-3)


@pytest.mark.parametrize(
    "name,payload,message",
    [
        ("empty.pdb", b"", "file: empty"),
        ("garbage.cif", bytes(range(256)) * 8, "binary content"),
        ("truncated.pdb", b"HEADER    X\nATOM      1  N   MET A   1      19.594  32.3", "line 2: truncated"),
        ("water.pdb", b"HETATM    1  O   HOH A   1       1.000   2.000   3.000  1.00 10.00           O\n",
         "chains: no protein chain"),
        ("text.pdb", b"hello world\n", "atoms: no ATOM/HETATM records"),
        ("bad.cif.gz", gzip.compress(b"data_x\n_atom_site.id\n", mtime=0)[:-6], "gzip: corrupt or truncated"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_file(tmp_path, name, payload, message):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=message) as info:
        read_chains(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize("text", ["", "SEQRES   1 A", "SEQRES   1 A\n", "HEADER\nSEQRES a\nSEQRES b\r\nATOM\nSEQRES",
                                  "ATOM SEQRES\nxSEQRES\n SEQRES\nSEQRESSEQRES\n\nSEQRES", "\nSEQRES\n\n"])
def test_record_lines_are_the_multiline_regex_matches(text):
    """The substring scan that finds SEQRES records returns what the multiline regex it replaces did."""
    import re

    from data.deposited import _record_lines

    assert _record_lines(text, "SEQRES") == re.findall(r"^SEQRES.*", text, re.M)


def test_record_lines_of_shared_files():
    import re

    from data.deposited import _record_lines

    for path in sorted(SHARED.glob("*.pdb")):
        text = path.read_text(errors="replace")
        assert _record_lines(text, "SEQRES") == re.findall(r"^SEQRES.*", text, re.M), path.name
