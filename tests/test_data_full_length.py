"""Full-length chains (issue 11): the deposited sequence of every shared chain, which positions are observed,
numbering, fallbacks, the dataset format version and a data layer that needs no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from Bio.PDB.MMCIF2Dict import MMCIF2Dict

from data import residue_constants
from data.chains import DATASET_FORMAT, load_chain, read_manifest, save_chain
from data.dataset import crop_start
from data.prepare import prepare_dataset
from data.structure import chain_to_pdb, read_chain, read_chains
from tests.shared_data import SHARED_STRUCTURES

SHARED = SHARED_STRUCTURES
ROOT = Path(__file__).resolve().parents[1]
MANIFEST = pd.read_csv(SHARED / "MANIFEST.csv", keep_default_na=False, dtype=str)
MANIFEST["name"] = MANIFEST.file.map(lambda f: Path(f).name)
CIF_FILES = sorted(MANIFEST.name[MANIFEST.name.str.endswith(".cif")].unique())
# 1ejg residue 22 is a Pro/Ser microheterogeneity: gemmi counts both conformers, we keep one.
MANIFEST_EXTRA_CONFORMERS = {("1ejg.pdb", "A"): 1}


def _entity_sequences(path: Path) -> dict[str, str]:
    """Independent reading of the file: {author chain: the entity's pdbx_seq_one_letter_code_can}."""
    cif = MMCIF2Dict(str(path))
    as_list = lambda key: cif[key] if isinstance(cif[key], list) else [cif[key]]  # noqa: E731
    can = {e: "".join(code.split()) for e, code in zip(as_list("_entity_poly.entity_id"),
                                                       as_list("_entity_poly.pdbx_seq_one_letter_code_can"))}
    chains = {}
    for entity, strands in zip(as_list("_entity_poly.entity_id"), as_list("_entity_poly.pdbx_strand_id")):
        for strand in strands.split(","):
            chains[strand.strip()] = can[entity]
    return chains


@pytest.mark.parametrize("file_name", CIF_FILES)
def test_mmcif_full_sequence_is_the_entity_sequence(file_name):
    chains = read_chains(SHARED / file_name)
    rows = MANIFEST[MANIFEST.name == file_name].set_index("chain")
    if "_entity_poly.pdbx_seq_one_letter_code_can" not in MMCIF2Dict(str(SHARED / file_name)):
        # 6wqa.cif is a stripped mmCIF (atom_site only): it falls back to its observed residues, said so.
        assert all(c.sequence_source == "observed" and "no _pdbx_poly_seq_scheme" in c.sequence_note for c in chains)
        return
    entity = _entity_sequences(SHARED / file_name)
    for chain in chains:
        assert chain.sequence_source == "mmcif", (file_name, chain.chain, chain.sequence_note)
        assert chain.sequence == entity[chain.chain], (file_name, chain.chain)
        assert chain.n_observed == int(rows.loc[chain.chain, "n_residues"]), (file_name, chain.chain)
        assert chain.residue_index.tolist() == list(range(len(chain)))
        # Unobserved positions carry nothing; observed ones have their CA.
        assert not chain.atom37_mask[~chain.observed].any()
        assert chain.atom37_mask[chain.observed, 1].all()
        np.testing.assert_array_equal(chain.atom37_positions[~chain.observed], 0.0)


def test_every_shared_chain_counts_its_observed_residues():
    for row in MANIFEST.itertuples():
        chain = read_chain(SHARED / row.name, chain="_" if row.chain == "(blank)" else row.chain)
        expected = int(row.n_residues) - MANIFEST_EXTRA_CONFORMERS.get((row.name, row.chain), 0)
        assert chain.n_observed == expected, (row.name, row.chain)
        assert len(chain) >= chain.n_observed


def _remark_465(path: Path) -> dict[str, list[tuple[str, int, str]]]:
    """Independent oracle: {chain: [(residue name, number, insertion code)]} of REMARK 465 (missing
    residues), in file order."""
    missing: dict[str, list] = {}
    in_table = False
    for line in path.read_text().splitlines():
        if not line.startswith("REMARK 465"):
            continue
        if "RES C SSSEQI" in line or "RES C  SSEQI" in line:
            in_table = True
            continue
        if in_table and line[15:18].strip():
            missing.setdefault(line[19], []).append((line[15:18].strip(), int(line[20:26]), line[26].strip()))
    return missing


GAPPED_PDB = ["1bhl.pdb", "1iqj.pdb", "1o1z.pdb", "1orc.pdb", "1pwc.pdb", "2rbg.pdb", "3htn.pdb", "5h73.pdb",
              "5l33.pdb", "5ugo.pdb", "5zng.pdb"]


@pytest.mark.parametrize("file_name", GAPPED_PDB)
def test_pdb_seqres_gaps_flag_the_missing_residues(file_name):
    """The positions we flag unobserved are exactly the residues REMARK 465 lists (names, in order); where the
    file's numbering runs through the gap, their numbers agree too."""
    missing = _remark_465(SHARED / file_name)
    assert missing, file_name
    seqres: dict[str, list[str]] = {}
    for line in (SHARED / file_name).read_text().splitlines():
        if line.startswith("SEQRES"):
            seqres.setdefault(line[11], []).extend(line[19:].split())
    for chain in read_chains(SHARED / file_name):
        assert chain.sequence_source == "seqres" and len(chain) == len(seqres[chain.chain])
        expected = missing.get(chain.chain, [])
        unobserved = np.flatnonzero(~chain.observed)
        names = [seqres[chain.chain][p] for p in unobserved]
        assert names == [name for name, _, _ in expected], (file_name, chain.chain)
        same_numbers = [(int(chain.author_number[p]), str(chain.insertion_code[p])) for p in unobserved]
        if file_name != "3htn.pdb":  # 3htn numbers its expression tag 0, 38, 39, ...: we continue from 43 down
            assert same_numbers == [(n, c) for _, n, c in expected], (file_name, chain.chain)


def test_hand_checked_gaps_in_1orc():
    """1orc chain A (read by eye): SEQRES has 71 residues; MET 1, GLU 2 and the C-terminal KKTTA (62-66) are
    missing; the engineered loop is numbered 56, 56A..56E, so 71 positions span author numbers 1..66."""
    chain = read_chain(SHARED / "1orc.pdb")
    assert (len(chain), chain.n_observed) == (71, 64)
    assert chain.sequence == "MEQRITLKDYAMRFGQTKTAKDLGVYQSAINKAIHAGRKIFLTINADGSVYAEEVKDGEVKPFPSNKKTTA"
    assert np.flatnonzero(~chain.observed).tolist() == [0, 1, 66, 67, 68, 69, 70]
    labels = [f"{n}{c}" for n, c in zip(chain.author_number, chain.insertion_code)]
    assert labels[:3] == ["1", "2", "3"] and labels[55:61] == ["56", "56A", "56B", "56C", "56D", "56E"]
    assert labels[-5:] == ["62", "63", "64", "65", "66"]


def test_insertion_codes_give_distinct_positions():
    for file_name in ("1gbt.cif", "1orc.pdb", "2fzz.pdb"):
        for chain in read_chains(SHARED / file_name):
            assert chain.residue_index.tolist() == list(range(len(chain)))
            keys = list(zip(chain.author_number.tolist(), chain.insertion_code.tolist()))
            assert len(set(keys)) == len(keys), (file_name, chain.chain)
    trypsin = read_chain(SHARED / "1gbt.cif")
    labels = [f"{n}{c}" for n, c in zip(trypsin.author_number, trypsin.insertion_code)]
    assert labels.index("184A") == labels.index("184") + 1  # consecutive deposited positions


def test_unreconcilable_seqres_falls_back_and_is_reported(tmp_path):
    text = (SHARED / "1ubi.pdb").read_text()
    lines = text.splitlines()
    poly_gly = [f"SEQRES {i + 1:3d} A   76  " + " ".join(["GLY"] * min(13, 76 - 13 * i)) for i in range(6)]
    wrong = [line for line in lines if not line.startswith("SEQRES")]
    at = next(i for i, line in enumerate(wrong) if line.startswith(("ATOM", "HETATM", "CRYST1")))
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in" / "1ubi.pdb"
    bad.write_text("\n".join(wrong[:at] + poly_gly + wrong[at:]) + "\n")
    chain = read_chain(bad)
    assert chain.sequence_source == "observed" and chain.unreconciled
    assert "SEQRES not reconciled" in chain.sequence_note and len(chain) == chain.n_observed == 76
    summary = prepare_dataset([bad], tmp_path / "ds", progress=False)
    assert summary.chains_written == 1 and summary.chains_unreconciled == 1
    errors = pd.read_csv(tmp_path / "ds" / "errors.csv", keep_default_na=False)
    assert errors.stage.tolist() == ["sequence"] and "observed residues only" in errors.reason[0]
    assert read_manifest(tmp_path / "ds").sequence_source.tolist() == ["observed"]


def test_pdb_round_trip_of_a_gapped_chain_keeps_positions(tmp_path):
    native = read_chain(SHARED / "5zng.pdb", chain="A")  # 137 deposited, 79 observed
    for numbering in ("author", "index"):
        path = tmp_path / f"{numbering}.pdb"
        path.write_text(chain_to_pdb(native, numbering=numbering))
        back = read_chain(path)
        assert back.sequence == native.sequence and back.sequence_source == "seqres"
        np.testing.assert_array_equal(back.observed, native.observed)
        np.testing.assert_allclose(back.atom37_positions, native.atom37_positions, atol=6e-4)


def test_crops_always_hold_an_observed_residue():
    observed = np.zeros(300, dtype=bool)
    observed[[5, 250]] = True  # two observed residues in a long unobserved chain
    starts = {crop_start(300, 40, seed=1, epoch=e, index=0, observed=observed) for e in range(400)}
    valid = {s for s in range(261) if observed[s : s + 40].any()}
    assert starts <= valid and len(starts) > 0.8 * len(valid)  # uniform over the valid starts only
    # without a mask every start is valid, drawn as before full-length chains
    assert crop_start(100, 30, 3, 2, 5) == int(np.random.default_rng([3, 2, 5]).integers(0, 71))


def test_old_dataset_gets_one_clear_line(tmp_path):
    chain = read_chain(SHARED / "1ubi.pdb")
    new = tmp_path / "new.npz"
    save_chain(chain, new)
    with np.load(new) as npz:
        arrays = {k: npz[k] for k in npz.files if k not in ("format_version", "observed", "author_number")}
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(ValueError, match=r"old\.npz: format: chain file of dataset format 1.*rerun `foldtune prepare`"):
        load_chain(tmp_path / "old.npz")
    assert int(np.load(new)["format_version"]) == DATASET_FORMAT == 2
    (tmp_path / "ds").mkdir()
    pd.DataFrame([{"chain_id": "1ubi_A", "pdb_id": "1UBI", "chain": "A", "length": 76, "sequence": chain.sequence,
                   "method": "", "resolution": "", "release_date": "", "source_file": "", "npz": "chains/x.npz"}]
                 ).to_csv(tmp_path / "ds" / "manifest.csv", index=False)
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "split", "--dataset", str(tmp_path / "ds"),
                             "--out", str(tmp_path / "splits.csv")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    message = (result.stdout + result.stderr).strip().splitlines()
    assert len(message) == 1 and "dataset format 1" in message[0] and "rerun `foldtune prepare`" in message[0]


def test_residue_constants_equal_openfold_tables():
    from transformers.models.esm.openfold_utils import residue_constants as upstream

    for name in ("restypes", "restype_num", "restype_order", "restypes_with_x", "restype_order_with_x",
                 "restype_1to3", "restype_3to1", "atom_types", "atom_order", "atom_type_num"):
        assert getattr(residue_constants, name) == getattr(upstream, name), name
    assert residue_constants.residue_atoms.keys() == upstream.residue_atoms.keys()
    for resname, atoms in upstream.residue_atoms.items():
        assert sorted(residue_constants.residue_atoms[resname]) == sorted(atoms), resname  # a set: order unused


def test_data_layer_parses_and_prepares_without_torch(tmp_path):
    script = f"""
import json, sys
from data.prepare import prepare_dataset
from data.chains import load_chain, read_manifest
from data.structure import read_chain, chain_to_pdb
from data.tokenize import af2_sequence
summary = prepare_dataset([{str(SHARED / '1orc.pdb')!r}, {str(SHARED / '4i6p.cif')!r}], {str(tmp_path / 'ds')!r},
                          progress=False)
manifest = read_manifest({str(tmp_path / 'ds')!r})
chain = load_chain({str(tmp_path / 'ds')!r} + "/" + manifest.npz[0])
chain_to_pdb(chain)
print(json.dumps({{"written": summary.chains_written, "heavy": sorted(m for m in ("torch", "transformers", "esm")
                                                                    if m in sys.modules)}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"written": 3, "heavy": []}
