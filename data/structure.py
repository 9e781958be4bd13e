"""Read protein chains from PDB / mmCIF files (plain or gzip) into atom37 arrays, and write them back.

Cleaning rules (issue 3):
- one model (the first by default; ``model`` is the 1-based position in the file);
- alternate locations: the highest-occupancy conformer of each atom (first one on ties); for point
  mutations (two residue names at one position) the residue whose atoms have the higher total occupancy;
- modified amino acids become their parent (``MODIFIED_PARENT``: MSE->MET with SE->SD, CAS->CYS, ...); atoms
  that the parent residue does not have (phosphates, the As of CAS, ...) are dropped; other polymer residues
  with an N-CA-C backbone become ``X`` (backbone + CB kept);
- hydrogens, waters, ligands and nucleic-acid residues are dropped; a chain with no amino acid left is not a
  protein chain;
- a residue is observed only if it has a CA atom (the MANIFEST ``n_residues`` convention); missing atoms stay
  visible through ``atom37_mask``; insertion codes are kept in file order.

Full-length chains (issue 11): a chain is its *deposited* sequence (mmCIF ``_pdbx_poly_seq_scheme`` +
``pdbx_seq_one_letter_code_can``, PDB ``SEQRES``; see ``data.deposited``) with an ``observed`` flag per position,
atom37 arrays that are zero where unobserved, ``residue_index`` 0..N-1 along that sequence, and author numbers.
Files without a deposited sequence, or whose sequence cannot be reconciled with the observed residues, give
the observed residues only (``sequence_source == "observed"``, the reason in ``sequence_note``).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from data import residue_constants as rc
from data.deposited import DepositedSequence, Unreconcilable, mmcif_sequences, place, seqres_sequences

ATOM_TYPES: list[str] = list(rc.atom_types)
ATOM_ORDER: dict[str, int] = dict(rc.atom_order)
UNKNOWN_AATYPE = rc.restype_num  # 20 = X

# Modified amino acid (CCD code) -> parent, with atoms renamed onto the parent's names where they differ.
MODIFIED_PARENT: dict[str, str] = {
    "MSE": "MET", "SEC": "CYS", "CAS": "CYS", "CSO": "CYS", "CSD": "CYS", "CME": "CYS", "OCS": "CYS",
    "CSX": "CYS", "CSS": "CYS", "SMC": "CYS", "SCY": "CYS", "SEP": "SER", "SAC": "SER", "TPO": "THR",
    "PTR": "TYR", "TYS": "TYR", "HYP": "PRO", "MLY": "LYS", "M3L": "LYS", "KCX": "LYS", "ALY": "LYS",
    "LLP": "LYS", "MLZ": "LYS", "FME": "MET", "MLE": "LEU", "NLE": "LEU", "CGU": "GLU", "PCA": "GLN",
    "HIC": "HIS", "NEP": "HIS", "MHS": "HIS", "MEN": "ASN", "AGM": "ARG", "PHD": "ASP", "DAH": "PHE",
}
ATOM_RENAME: dict[str, dict[str, str]] = {"MSE": {"SE": "SD"}, "SEC": {"SE": "SG"}}

_STANDARD_3TO1: dict[str, str] = dict(rc.restype_3to1)
_BACKBONE = ("N", "CA", "C")
_UNKNOWN_ATOMS = frozenset({"N", "CA", "C", "O", "CB", "OXT"})
# Atoms each parent residue may carry: its heavy atoms plus the terminal OXT.
_ALLOWED_ATOMS: dict[str, frozenset[str]] = {
    resname: frozenset([a for a in rc.residue_atoms[resname]] + ["OXT"]) for resname in rc.residue_atoms
}
_WATER = frozenset({"HOH", "WAT", "DOD", "H2O"})
_PDB_ID = re.compile(r"^(\d[A-Za-z0-9]{3})(?:$|[_.\-])")


SEQUENCE_SOURCES = ("mmcif", "seqres", "observed")
UNRECONCILED = "not reconciled with the observed residues"  # in ``sequence_note`` of such fallbacks


@dataclass
class ProteinChain:
    """One cleaned protein chain of N positions along its deposited sequence (L of them observed).

    ``author_number``/``insertion_code`` number every position: observed positions carry the file's author
    numbering, unobserved ones the mmCIF ``pdb_seq_num`` or numbers continued from their neighbours
    (``data.deposited.assign_numbers``); they are unique unless the file's own numbering is not.
    ``author_number`` defaults to ``residue_index + 1`` and ``observed`` to "every position".
    """

    pdb_id: str
    chain: str
    model: int
    sequence: str  # (N letters) one-letter, parents of modified residues (MSE->M), unknown -> X
    aatype: np.ndarray  # (N,) int64, AF2 order 0..20
    residue_index: np.ndarray  # (N,) int64, 0..N-1 along the deposited sequence (the model's position ids)
    insertion_code: np.ndarray  # (N,) '<U1', '' when none
    atom37_positions: np.ndarray  # (N, 37, 3) float32, Å; zero where unobserved
    atom37_mask: np.ndarray  # (N, 37) float32; zero where unobserved
    b_factors: np.ndarray  # (N, 37) float32 (pLDDT for predicted models)
    method: str | None = None
    resolution: float | None = None
    release_date: str | None = None
    source_file: str = ""
    modified_residues: dict[str, int] = field(default_factory=dict)  # e.g. {"MSE": 4} -> why M differs
    observed: np.ndarray | None = None  # (N,) bool, the position has a CA atom
    author_number: np.ndarray | None = None  # (N,) int64
    sequence_source: str = "observed"  # one of SEQUENCE_SOURCES
    sequence_note: str = ""  # why the deposited sequence was not used (fallbacks), else ""

    def __post_init__(self) -> None:
        n = len(self.aatype)
        if self.observed is None:
            self.observed = np.ones(n, dtype=bool)
        if self.author_number is None:
            self.author_number = np.asarray(self.residue_index, dtype=np.int64) + 1
        if self.sequence_source not in SEQUENCE_SOURCES:
            raise ValueError(f"sequence_source: must be one of {SEQUENCE_SOURCES}, got {self.sequence_source!r}")

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def n_observed(self) -> int:
        return int(np.count_nonzero(self.observed))

    @property
    def unreconciled(self) -> bool:
        """The file has a deposited sequence, but it did not match the observed residues (see sequence_note)."""
        return self.sequence_source == "observed" and UNRECONCILED in self.sequence_note

    @property
    def has_deposited_sequence(self) -> bool:
        """True when ``residue_index`` is the position in a deposited sequence (not just the observed order)."""
        return self.sequence_source != "observed"

    def observed_residues(self) -> "ProteinChain":
        """The chain cut down to its observed positions (what a chain was before full-length chains):
        ``residue_index`` 0..L-1, author numbering kept, ``sequence_source`` "observed"."""
        keep = np.flatnonzero(self.observed)
        arrays = {key: np.asarray(getattr(self, key))[keep].copy() for key in
                  ("aatype", "insertion_code", "atom37_positions", "atom37_mask", "b_factors", "observed",
                   "author_number")}
        note = self.sequence_note if not self.has_deposited_sequence else "observed residues of a full-length chain"
        return replace(self, sequence="".join(self.sequence[i] for i in keep), residue_index=np.arange(len(keep)),
                       sequence_source="observed", sequence_note=note, **arrays)

    @property
    def chain_id(self) -> str:
        """Dataset key ``f"{pdb_id.lower()}_{chain}"``; a blank chain id is written as ``_``."""
        return f"{self.pdb_id.lower()}_{self.chain or '_'}"

    @property
    def unknown_fraction(self) -> float:
        return self.sequence.count("X") / max(len(self.sequence), 1)


# ----------------------------------------------------------------------------------------------- reading
def read_text(path: str | os.PathLike) -> str:
    """File contents as text; gzip is recognised by its magic bytes, not only by the ``.gz`` suffix.

    Raises ``ValueError("{path}: ...")`` for empty, binary, truncated-gzip or unreadable files.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: file: cannot read ({exc.strerror or exc})") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"{path}: gzip: corrupt or truncated ({exc})") from exc
    if not raw.strip():
        raise ValueError(f"{path}: file: empty")
    if b"\x00" in raw[:65536]:
        raise ValueError(f"{path}: file: binary content, not a PDB/mmCIF text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
        printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text[:65536])
        if printable < 0.98 * min(len(text), 65536):
            raise ValueError(f"{path}: file: binary content, not a PDB/mmCIF text file") from None
        return text


def detect_format(text: str) -> str:
    """``"mmcif"`` or ``"pdb"``, from the content (file suffixes lie often enough)."""
    head = text[:4096].lstrip()
    atom_site = "_atom_site." in text and re.search(r"^_atom_site\.", text, re.M)  # substring test first: fast
    if head.startswith("data_") or atom_site or re.search(r"^loop_\s*$", head, re.M):
        return "mmcif"
    return "pdb"


def _check_pdb_records(text: str, path: Path) -> None:
    """Reject truncated/garbled coordinate records, which Biopython would otherwise skip with a warning."""
    lines = text.splitlines()
    n_atoms = 0
    for number, line in enumerate(lines, 1):
        if line.startswith(("ATOM  ", "HETATM")):
            n_atoms += 1
            try:
                float(line[30:38]), float(line[38:46]), float(line[46:54])
            except ValueError:
                raise ValueError(f"{path}: line {number}: truncated or malformed coordinate record") from None
    if n_atoms == 0:
        raise ValueError(f"{path}: atoms: no ATOM/HETATM records (not a coordinate file?)")


def _loop_row_fields(line: str) -> int:
    return len(re.findall(r"'[^']*'|\"[^\"]*\"|\S+", line))


def mmcif_atom_site_problem(text: str, require_terminator: bool = True) -> str | None:
    """Why an mmCIF text's ``_atom_site`` loop is incomplete, or None: no rows, a last row with fewer values
    than columns (a file cut inside a row), or (``require_terminator``) a loop not closed by ``#`` or another
    item before the end of the file (a download cut at a line boundary; a model written by another tool may
    legitimately end there). Biopython would read either cut as a shorter chain, or fail with IndexError."""
    columns, rows, closed, last_row = 0, 0, False, ""
    for line in text.splitlines():
        if line.startswith("_atom_site."):
            columns += 1
            continue
        if columns:
            stripped = line.strip()
            if stripped.startswith(("#", "_", "loop_", "data_")):
                closed = True
                break
            if stripped:
                rows += 1
                last_row = stripped
    if not columns or not rows:
        return "mmCIF without _atom_site records"
    values = _loop_row_fields(last_row)
    if values != columns:
        return f"truncated _atom_site loop (last row has {values} of {columns} values)"
    if require_terminator and not closed:
        return "truncated (_atom_site loop not closed before end of file)"
    return None


def _check_mmcif_atom_site(text: str, path: Path, require_terminator: bool) -> None:
    if "_atom_site." not in text:
        raise ValueError(f"{path}: _atom_site: no atom_site loop (not a coordinate file?)")
    problem = mmcif_atom_site_problem(text, require_terminator)
    if problem is not None:
        raise ValueError(f"{path}: mmCIF: {problem}")


def _pdb_id_from_name(path: Path) -> str:
    stem = path.name
    for suffix in (".gz", ".cif", ".mmcif", ".pdb", ".ent", ".txt"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    if stem.lower().startswith("pdb") and _PDB_ID.match(stem[3:]):  # pdb1abc.ent
        stem = stem[3:]
    match = _PDB_ID.match(stem)
    # "1ake_A" -> 1AKE; "7sgn_C_model" keeps its stem so a model and its target never share a chain_id.
    if match and (len(stem) == 4 or re.fullmatch(r"\d[A-Za-z0-9]{3}_[A-Za-z0-9]{1,4}", stem)):
        return match.group(1).upper()
    return stem


def _first(mmcif: dict, key: str) -> str | None:
    value = mmcif.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    if value in (None, "?", "."):
        return None
    return str(value)


def _float_or_none(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _mmcif_metadata(mmcif: dict) -> dict:
    methods = mmcif.get("_exptl.method")
    if isinstance(methods, list):
        methods = ";".join(m for m in methods if m not in ("?", "."))
    resolution = None
    for key in ("_refine.ls_d_res_high", "_em_3d_reconstruction.resolution", "_reflns.d_resolution_high"):
        resolution = _float_or_none(_first(mmcif, key))
        if resolution is not None:
            break
    release = _first(mmcif, "_pdbx_audit_revision_history.revision_date") or _first(mmcif, "_database_PDB_rev.date")
    return {
        "pdb_id": _first(mmcif, "_entry.id"),
        "method": methods.upper() if methods else None,
        "resolution": resolution,
        "release_date": release,
    }


def _pdb_metadata(header: dict) -> dict:
    method = (header.get("structure_method") or "").strip()
    release = header.get("release_date") or None
    if release in ("1909-01-08",):  # Biopython's placeholder for a missing date
        release = None
    return {
        "pdb_id": (header.get("idcode") or "").strip() or None,
        "method": method.upper() if method and method != "unknown" else None,
        "resolution": _float_or_none(header.get("resolution")),
        "release_date": release,
    }


def _deposited(reader, source, what: str) -> tuple[dict[str, DepositedSequence], str]:
    """Deposited sequences by chain id, and the note for chains without one; a garbled table is noted, not fatal."""
    try:
        sequences = reader(source, MODIFIED_PARENT)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return {}, f"{what} unreadable ({type(exc).__name__}: {exc})"
    return sequences, f"no {what} in the file"


def _parse(path: Path, text: str, fmt: str, require_terminator: bool = False):
    """(Biopython Structure, metadata dict, deposited sequences by chain id, why there are none) for the
    ``text`` of a PDB or mmCIF file (``fmt``: :func:`detect_format`; require_terminator: see
    :func:`mmcif_atom_site_problem`)."""
    from Bio.PDB import MMCIFParser, PDBParser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if fmt == "mmcif":
                _check_mmcif_atom_site(text, path, require_terminator)
                parser = MMCIFParser(QUIET=True)
                structure = parser.get_structure(path.stem, io.StringIO(text))
                metadata = _mmcif_metadata(parser._mmcif_dict)
                deposited, missing = _deposited(mmcif_sequences, parser._mmcif_dict, "_pdbx_poly_seq_scheme")
            else:
                _check_pdb_records(text, path)
                structure = PDBParser(QUIET=True).get_structure(path.stem, io.StringIO(text))
                metadata = _pdb_metadata(structure.header)
                deposited, missing = _deposited(seqres_sequences, text, "SEQRES records")
        except ValueError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise ValueError(f"{path}: {fmt}: unreadable ({exc})") from exc
        except Exception as exc:  # Biopython raises many exception types on garbled input
            raise ValueError(f"{path}: {fmt}: unreadable ({type(exc).__name__}: {exc})") from exc
    metadata["pdb_id"] = (metadata["pdb_id"] or _pdb_id_from_name(path)).strip()
    return structure, metadata, deposited, missing


def _pick_residue(residue):
    """The conformer of a point-mutation site with the highest total occupancy (first on ties)."""
    if not residue.is_disordered() or not hasattr(residue, "disordered_get_id_list"):
        return residue
    best, best_occupancy = None, -1.0
    for name in residue.disordered_get_id_list():
        child = residue.child_dict[name]
        occupancy = sum(max((a.get_occupancy() or 0.0), 0.0) for a in child.get_atoms())
        if occupancy > best_occupancy + 1e-6:
            best, best_occupancy = child, occupancy
    return best


def _parent_name(residue) -> tuple[str, str] | None:
    """(parent 3-letter name or 'UNK', one-letter code) for amino acids, None for anything else."""
    resname = residue.get_resname().strip().upper()
    if resname in _WATER:
        return None
    if resname in _STANDARD_3TO1:
        return resname, _STANDARD_3TO1[resname]
    if resname in MODIFIED_PARENT:
        parent = MODIFIED_PARENT[resname]
        return parent, _STANDARD_3TO1[parent]
    if resname == "UNK":
        return "UNK", "X"
    return None


def _is_polymer_unknown(residue, previous) -> bool:
    """An unlisted residue is an unknown amino acid if it has an N-CA-C backbone and is in the chain:
    an ATOM record, or peptide-bonded (C-N < 2 Å) to the previous amino acid."""
    if not all(name in residue for name in _BACKBONE):
        return False
    if residue.id[0] == " ":
        return True
    return previous is not None and "C" in previous and float(previous["C"] - residue["N"]) < 2.0


def _atom_name(atom) -> str:
    return atom.get_id().strip().upper()


def _chain_arrays(chain_entity) -> dict | None:
    rows = []  # (one_letter, resnum, icode, positions, mask, bfac, original resname)
    previous_aa = None
    for raw_residue in chain_entity:
        residue = _pick_residue(raw_residue)
        hetflag, resnum, icode = residue.id
        if hetflag == "W":
            continue
        names = _parent_name(residue)
        if names is None:
            if not _is_polymer_unknown(residue, previous_aa):
                continue
            names = ("UNK", "X")
        parent, one_letter = names
        if "CA" not in residue:
            continue
        resname = residue.get_resname().strip().upper()
        rename = ATOM_RENAME.get(resname, {})
        allowed = _ALLOWED_ATOMS.get(parent, _UNKNOWN_ATOMS)
        positions = np.zeros((37, 3), np.float32)
        mask = np.zeros(37, np.float32)
        bfac = np.zeros(37, np.float32)
        for atom in residue.get_atoms():  # disordered atoms yield their selected (highest-occupancy) child
            if (atom.element or "").strip().upper() in ("H", "D"):
                continue
            name = rename.get(_atom_name(atom), _atom_name(atom))
            if name not in allowed:
                continue
            index = ATOM_ORDER[name]
            positions[index] = atom.get_coord()
            mask[index] = 1.0
            bfac[index] = atom.get_bfactor()
        rows.append((one_letter, int(resnum), (icode or "").strip(), positions, mask, bfac, resname))
        previous_aa = residue
    if not rows:
        return None
    sequence = "".join(r[0] for r in rows)
    modified: dict[str, int] = {}
    for r in rows:
        if r[6] in MODIFIED_PARENT:
            modified[r[6]] = modified.get(r[6], 0) + 1
    return {
        "sequence": sequence,
        "aatype": _aatype(sequence),
        "residue_index": np.arange(len(rows), dtype=np.int64),
        "author_number": np.array([r[1] for r in rows], np.int64),
        "insertion_code": np.array([r[2] for r in rows], dtype="<U1"),
        "atom37_positions": np.stack([r[3] for r in rows]).astype(np.float32),
        "atom37_mask": np.stack([r[4] for r in rows]).astype(np.float32),
        "b_factors": np.stack([r[5] for r in rows]).astype(np.float32),
        "modified_residues": modified,
    }


def _aatype(sequence: str) -> np.ndarray:
    return np.array([rc.restype_order_with_x.get(c, UNKNOWN_AATYPE) for c in sequence], np.int64)


def _full_length(observed: dict, deposited: DepositedSequence | None, missing: str) -> dict:
    """The observed-residue arrays of ``_chain_arrays`` laid out on the deposited sequence.

    Adds ``observed``, ``sequence_source`` and ``sequence_note``. Without a usable deposited sequence the
    observed residues are the chain (source ``"observed"``, the reason in the note).
    """
    n_obs = len(observed["sequence"])
    fallback = {**observed, "observed": np.ones(n_obs, dtype=bool), "sequence_source": "observed"}
    if deposited is None:
        return {**fallback, "sequence_note": missing}
    try:
        placed = place(observed["sequence"], observed["author_number"], observed["insertion_code"],
                       observed["atom37_positions"], observed["atom37_mask"], deposited)
    except Unreconcilable as exc:
        source = "_pdbx_poly_seq_scheme" if deposited.source == "mmcif" else "SEQRES"
        return {**fallback, "sequence_note": f"{source} {UNRECONCILED}: {exc}"}
    n = len(placed.sequence)
    where = placed.positions
    full = {"sequence": placed.sequence, "aatype": _aatype(placed.sequence),
            "residue_index": np.arange(n, dtype=np.int64), "observed": np.zeros(n, dtype=bool),
            "modified_residues": observed["modified_residues"], "sequence_source": deposited.source,
            "sequence_note": ""}
    full["observed"][where] = True
    for key, shape in (("atom37_positions", (n, 37, 3)), ("atom37_mask", (n, 37)), ("b_factors", (n, 37))):
        full[key] = np.zeros(shape, np.float32)
        full[key][where] = observed[key]
    if placed.numbers is not None:
        full["author_number"], full["insertion_code"] = placed.numbers, placed.codes
    else:  # the file's own numbering repeats a key: keep it where observed, continue it elsewhere
        full["author_number"] = np.zeros(n, np.int64)
        full["insertion_code"] = np.full(n, "", dtype="<U1")
        full["author_number"][where] = observed["author_number"]
        full["insertion_code"][where] = observed["insertion_code"]
    return full


def _select_model(structure, path: Path, model: int):
    models = list(structure)
    if not models:
        raise ValueError(f"{path}: model: file has no models/atoms")
    if not 1 <= model <= len(models):
        raise ValueError(f"{path}: model: model {model} requested, file has {len(models)}")
    return models[model - 1]


def _normalise_chain_name(chain: str | None) -> str | None:
    if chain is None:
        return None
    return "" if chain.strip() in ("", "_", "(blank)") else chain.strip()


def _read_plain_pdb(path: Path, text: str, fmt: str, model: int):
    """(metadata, deposited sequences, why none, [(chain id, observed arrays)]) by the vectorised reader
    (``data.pdb_columns``), or None when the file is not a plain PDB file (then Biopython reads it)."""
    from data.pdb_columns import observed_chains

    if model != 1 or fmt != "pdb":
        return None
    found = observed_chains(text, MODIFIED_PARENT, ATOM_RENAME, _ALLOWED_ATOMS, _UNKNOWN_ATOMS, _WATER)
    if found is None:
        return None
    idcode, entities = found
    metadata = {"pdb_id": (idcode or _pdb_id_from_name(path)).strip(), "method": None, "resolution": None,
                "release_date": None}
    deposited, missing = _deposited(seqres_sequences, text, "SEQRES records")
    return metadata, deposited, missing, entities


def read_chains(path: str | os.PathLike, model: int = 1, plain_reader: bool = True,
                require_terminator: bool = False) -> list[ProteinChain]:
    """Every protein chain of ``model`` (1-based position in the file), in file order.

    Plain PDB files (ATOM records, one model, no alternate locations: predictions, cleaned references) are
    read by ``data.pdb_columns`` (~20x faster, same result); everything else by Biopython.
    ``plain_reader=False`` always uses Biopython (tests compare the two). An mmCIF whose _atom_site loop was
    cut is refused (``require_terminator``: also one cut at a line boundary, as downloads are checked).
    Raises ``ValueError("{path}: {field}: ...")`` for unreadable files or files with no protein chain.
    """
    path = Path(path)
    text = read_text(path)  # read (and gunzipped) once for whichever reader takes the file
    fmt = detect_format(text)
    found = _read_plain_pdb(path, text, fmt, model) if plain_reader else None
    if found is not None:
        metadata, deposited, missing, entities = found
    else:
        structure, metadata, deposited, missing = _parse(path, text, fmt, require_terminator)
        entities = [(chain_entity.id, _chain_arrays(chain_entity)) for chain_entity in _select_model(structure, path, model)]
    chains = []
    for entity_id, arrays in entities:
        if arrays is None:
            continue  # nucleic acid, ligand-only or water-only chain
        chain_name = entity_id.strip()
        if deposited:
            missing_here = f"chain {chain_name or '_'} has no deposited sequence in the file"
        else:
            missing_here = missing
        arrays = _full_length(arrays, deposited.get(chain_name) or deposited.get(entity_id), missing_here)
        chains.append(
            ProteinChain(
                pdb_id=metadata["pdb_id"], chain=chain_name, model=model,
                method=metadata["method"], resolution=metadata["resolution"],
                release_date=metadata["release_date"], source_file=str(path), **arrays,
            )
        )
    if not chains:
        raise ValueError(f"{path}: chains: no protein chain in model {model}")
    return chains


def read_chain(path: str | os.PathLike, chain: str | None = None, model: int = 1,
               plain_reader: bool = True) -> ProteinChain:
    """One protein chain (the first protein chain when ``chain`` is None; ``""``/``"_"`` = blank chain id)."""
    chains = read_chains(path, model=model, plain_reader=plain_reader)
    wanted = _normalise_chain_name(chain)
    if wanted is None:
        return chains[0]
    for candidate in chains:
        if candidate.chain == wanted:
            return candidate
    available = ",".join(c.chain or "_" for c in chains)
    raise ValueError(f"{path}: chain: no protein chain {chain!r} (protein chains: {available})")


def nonfinite_atoms(chain: ProteinChain) -> tuple[np.ndarray, list[str]]:
    """(bad (N, 37) bool: present atoms whose coordinates are NaN or ±inf, one line per residue holding one,
    e.g. ``residue 5 LEU: CA, CB`` in author numbering + insertion code)."""
    positions = np.asarray(chain.atom37_positions)
    if np.isfinite(positions).all():  # the common case in one pass (~50x faster than the masked test below)
        return np.zeros(positions.shape[:-1], dtype=bool), []
    bad = (np.asarray(chain.atom37_mask) > 0) & ~np.isfinite(positions).all(axis=-1)
    lines = []
    for index in np.flatnonzero(bad.any(axis=-1)):
        number = f"{int(chain.author_number[index])}{str(chain.insertion_code[index]).strip()}"
        name = rc.restype_1to3.get(chain.sequence[index], "UNK")
        atoms = ", ".join(rc.atom_types[a] for a in np.flatnonzero(bad[index]))
        lines.append(f"residue {number} {name}: {atoms}")
    return bad, lines


# ----------------------------------------------------------------------------------------------- writing
def _pdb_atom_name(name: str) -> str:
    # One-letter elements (all atom37 atoms): names shorter than 4 start in column 14.
    return f" {name:<3}" if len(name) < 4 else name


def _seqres_records(chain: ProteinChain, chain_char: str) -> list[str]:
    names = [rc.restype_1to3.get(letter, "UNK") for letter in chain.sequence]
    return [
        f"SEQRES {row + 1:3d} {chain_char} {len(names):4d}  " + " ".join(names[13 * row : 13 * row + 13])
        for row in range((len(names) + 12) // 13)
    ]


def numbering_is_unique(chain: ProteinChain) -> bool:
    """Whether (author number, insertion code) identifies each position and fits a PDB file."""
    numbers = chain.author_number.tolist()
    keys = set(zip(numbers, (str(c) for c in chain.insertion_code.tolist())))
    return len(keys) == len(numbers) and all(-999 <= n <= 9999 for n in numbers)


def chain_to_pdb(chain: ProteinChain, numbering: str = "author") -> str:
    """PDB text with one ATOM record per present atom37 atom (B-factor column = ``b_factors``).

    ``numbering="author"`` writes ``author_number`` + ``insertion_code``; ``"index"`` writes
    ``residue_index + 1`` (the position in the deposited sequence, as mmCIF ``label_seq_id``) with no
    insertion codes. Chains with a deposited sequence also get SEQRES records, so reading the file back
    restores the full sequence and which positions are observed. X residues are written as UNK. Chain ids
    longer than one character do not fit the PDB format and raise ``ValueError``; so do residue numbers
    outside -999..9999.
    """
    if numbering not in ("author", "index"):
        raise ValueError(f"numbering: must be 'author' or 'index', got {numbering!r}")
    chain_char = chain.chain or " "
    if len(chain_char) != 1:
        raise ValueError(f"{chain.source_file}: chain: id {chain.chain!r} does not fit a PDB file (1 character)")
    lines = []
    if re.fullmatch(r"\d[A-Za-z0-9]{3}", chain.pdb_id):  # lets read_chain recover the id from the text
        lines.append(f"HEADER    {'PROTEIN':<40}{'':9}   {chain.pdb_id.upper():4}")
    lines.append(f"REMARK   1 foldtune chain {chain.chain_id} from {Path(chain.source_file).name or '-'}")
    if numbering == "index":
        lines.append("REMARK   1 residues numbered by their position in the deposited sequence (1..N)")
    if chain.has_deposited_sequence:
        lines.extend(_seqres_records(chain, chain_char))
    serial = 0
    last = None
    for i, aa in enumerate(chain.aatype.tolist()):
        resname = rc.restype_1to3.get(rc.restypes_with_x[aa], "UNK") if aa < UNKNOWN_AATYPE else "UNK"
        if numbering == "index":
            resnum, icode = int(chain.residue_index[i]) + 1, ""
        else:
            resnum = int(chain.author_number[i])
            icode = str(chain.insertion_code[i]) if len(chain.insertion_code) else ""
        present = np.flatnonzero(chain.atom37_mask[i] > 0)
        if present.size and not -999 <= resnum <= 9999:
            raise ValueError(f"{chain.source_file}: residue number {resnum} does not fit a PDB file")
        for atom_index in present:
            serial += 1
            name = ATOM_TYPES[atom_index]
            x, y, z = (float(v) for v in chain.atom37_positions[i, atom_index])
            bfac = float(chain.b_factors[i, atom_index])
            lines.append(
                f"ATOM  {serial % 100000:5d} {_pdb_atom_name(name)} {resname:>3} {chain_char}{resnum:4d}{icode or ' ':1}"
                f"   {x:8.3f}{y:8.3f}{z:8.3f}{1.0:6.2f}{bfac:6.2f}          {name[0]:>2}  "
            )
            last = (resname, resnum, icode)
    if last is not None:
        serial += 1
        lines.append(f"TER   {serial % 100000:5d}      {last[0]:>3} {chain_char}{last[1]:4d}{last[2] or ' ':1}")
    lines.append("END")
    return "\n".join(lines) + "\n"
