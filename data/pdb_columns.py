"""A vectorised reader for plain PDB files, the common case of scoring: predictions, cleaned references.

``data.structure.read_chains`` parses with Biopython, which costs ~25-60 ms per 300-residue file (objects per
atom) plus ~80 ms to import. Files written by ``chain_to_pdb`` (every ``foldtune predict`` output) and most
model files have a simple shape: ATOM records only, one model, no alternate locations. For those this module
cuts the fixed PDB columns out of one byte matrix with NumPy (lines found by their offsets, decimals read as
integers) and builds the same observed-residue arrays as ``data.structure._chain_arrays`` (same cleaning rules),
in ~3-5 ms.

:func:`observed_chains` returns ``None`` for anything outside that shape, and the caller falls back to
Biopython: HETATM records, alternate locations, several models, a residue or chain split over
non-adjacent lines, repeated atom names, a missing or unusual element column, unparsable numbers, or header
records Biopython turns into metadata other than the id (EXPDTA, REVDAT, RESOLUTION). Within the shape the
result equals Biopython's field for field (tests/test_data_pdb_columns.py checks every PDB file shared with
the project and written ones).
"""

from __future__ import annotations

import re

import numpy as np

from data import residue_constants as rc

# Elements whose atoms Biopython keeps as given (no guessing from the atom name); hydrogens are dropped.
_HEAVY_ELEMENTS = frozenset({"C", "N", "O", "S", "SE"})
_HYDROGEN = "H"
_HEADER_ID = re.compile(r"\s+([1-9][0-9A-Z]{3})\s*\Z")  # Biopython's HEADER idcode pattern
_WIDTH = 80
_CHARACTERS = np.array([chr(c) for c in range(256)])  # byte value -> one-character string


def _header_id(header: list[str]) -> str | None:
    """The id Biopython's header parser takes from HEADER records (last match wins), or None when the header
    holds a record it would turn into other metadata (method, release date, resolution)."""
    idcode = ""
    for line in header:
        line = line.rstrip()
        key = line[:6].strip()
        if key in ("EXPDTA", "REVDAT") or "RESOLUTION" in line:
            return None
        if key == "HEADER":
            found = _HEADER_ID.search(line[10:].strip())
            if found is not None:
                idcode = found.group(1)
    return idcode


def _columns(chars: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Fixed columns ``[start, stop)`` of every row of an (n, 80) uint8 matrix, as (n,) bytes strings."""
    return np.ascontiguousarray(chars[:, start:stop]).view(f"S{stop - start}").ravel()


def _line_columns(buffer: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    """(n, width) uint8: the first ``width`` characters of each line [start, end), space-padded."""
    lengths = ends - starts
    if starts.size > 1 and lengths.min() >= width:
        steps = np.diff(starts)
        if (steps == steps[0]).all() and starts[-1] + width <= buffer.size:  # evenly spaced: a strided view
            view = np.lib.stride_tricks.as_strided(buffer[starts[0]:], shape=(starts.size, width),
                                                   strides=(int(steps[0]), 1), writeable=False)
            return np.array(view)
    chars = np.full((starts.size, width), ord(" "), dtype=np.uint8)
    for k in range(width):  # one gather per column: cheaper than a (n, width) index array
        inside = lengths > k
        chars[inside, k] = buffer[starts[inside] + k]
    return chars

def _decode(codes: np.ndarray, width: int) -> dict[int, str]:
    """{integer code: stripped upper-case text} for the distinct values of fixed-width byte columns."""
    distinct = np.unique(codes)
    texts = distinct.view(f"S{width}") if width > 1 else distinct.astype("S1")
    return {int(c): t.decode("ascii").strip().upper() for c, t in zip(distinct.tolist(), texts.tolist())}


def _right_aligned(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(magnitude (n,) float64, negative (n,) bool) of a (w, n) uint8 block, one field per column, whose
    fields are ``[blanks][-]digits`` (at least one digit), or None for any other layout.

    Column-major so that every test below runs over long contiguous rows (an (n, w) layout spends most of
    its time on the short inner axis). The magnitude is the digits as one integer; float64 holds it exactly
    (w <= 15), and the powers of ten times the digit matrix is one BLAS product.
    """
    digit = columns - np.uint8(ord("0"))  # non-digits wrap around to > 9
    is_digit = digit <= 9
    minus = columns == ord("-")
    # Once a digit appears only digits follow; a minus only right before the first digit.
    if not ((is_digit | minus | (columns == ord(" "))).all() and is_digit[-1].all()
            and (is_digit[1:] >= is_digit[:-1]).all() and (minus[:-1] <= is_digit[1:]).all()):
        return None
    digit[~is_digit] = 0
    powers = 10.0 ** np.arange(columns.shape[0] - 1, -1, -1)
    return powers @ digit.astype(np.float64), minus.any(0)


def _signed(magnitude: np.ndarray, negative: np.ndarray) -> np.ndarray:
    # "-0" is 0 (as int() reads it), not -0.0
    return np.where(negative & (magnitude > 0), -magnitude, magnitude)


def _decimal(chars: np.ndarray, start: int, stop: int) -> np.ndarray:
    """(n,) float64 of a fixed-width decimal column, equal to Python's ``float()`` of each field.

    Fields written as ``[-]digits.ddd`` with the point at one column for every row (what PDB writers do) are
    read as integer / 10^d: both are exact, so the one division rounds exactly like ``float()``. Other layouts
    go through NumPy's string conversion. Raises ValueError for a field that is not a number.
    """
    field = chars[:, start:stop]
    points = np.flatnonzero(field[0] == ord("."))
    if points.size == 1 and 0 < points[0] < field.shape[1] - 1 and (field[:, points[0]] == ord(".")).all():
        point = int(points[0])
        columns = np.ascontiguousarray(field.T)
        # The whole digits followed by the fraction's as one integer (a point elsewhere is not a digit:
        # declined); the fraction must be all digits.
        found = _right_aligned(np.concatenate([columns[:point], columns[point + 1:]]))
        if found is not None and (columns[point + 1:] - np.uint8(ord("0")) <= 9).all():
            magnitude, negative = found
            return _signed(magnitude, negative) / 10.0 ** (field.shape[1] - point - 1)
    return _columns(chars, start, stop).astype(np.float64)


def _integer(chars: np.ndarray, start: int, stop: int) -> np.ndarray:
    """(n,) int64 of a fixed-width integer column (as ``int()`` of each field); ValueError if one is not."""
    found = _right_aligned(np.ascontiguousarray(chars[:, start:stop].T))
    if found is None:
        return _columns(chars, start, stop).astype(np.int64)
    return _signed(*found).astype(np.int64)


def _change_points(*keys: np.ndarray) -> np.ndarray:
    """(n,) bool: row i starts a new run (row 0, or any key differs from row i - 1)."""
    n = keys[0].shape[0]
    new = np.zeros(n, dtype=bool)
    new[0] = n > 0
    for key in keys:
        new[1:] |= key[1:] != key[:-1]
    return new


def observed_chains(text: str, parents: dict[str, str], renames: dict[str, dict[str, str]],
                    allowed: dict[str, frozenset[str]], unknown_atoms: frozenset[str], water: frozenset[str],
                    ) -> tuple[str, list[tuple[str, dict]]] | None:
    """(pdb id, [(chain id as in the file, observed arrays)]) of model 1, or None (use Biopython).

    The arrays are those of ``data.structure._chain_arrays``: sequence, aatype, residue_index, author_number,
    insertion_code, atom37_positions (L, 37, 3), atom37_mask, b_factors (L, 37) and modified_residues.
    ``parents`` / ``renames`` / ``allowed`` / ``unknown_atoms`` / ``water`` are data.structure's cleaning
    tables (passed in so that one set of rules exists).
    """
    if not text.isascii():
        return None
    buffer = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    # Lines as (start, end) offsets; a trailing carriage return is not part of the line.
    newlines = np.flatnonzero(buffer == ord("\n"))
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [buffer.size]])
    ends = ends - ((ends > starts) & (buffer[np.maximum(ends - 1, 0)] == ord("\r")))
    head = _line_columns(buffer, starts, ends, 6)  # record names, space-padded
    record = head.view("S6").ravel()
    is_atom = record == b"ATOM  "
    coordinate = is_atom | (record == b"HETATM") | (record == b"MODEL ")
    if not coordinate.any() or (record == b"HETATM").any():
        return None
    first = int(np.argmax(coordinate))
    pdb_id = _header_id(text[: int(starts[first])].splitlines())
    if pdb_id is None:
        return None
    stops = np.flatnonzero(((record == b"END   ") | (record == b"CONECT")) & (np.arange(record.size) > first))
    stop = int(stops[0]) if stops.size else record.size
    if int((record[first:stop] == b"MODEL ").sum()) > 1:
        return None
    atom_lines = first + np.flatnonzero(is_atom[first:stop])
    if atom_lines.size == 0 or int((ends[atom_lines] - starts[atom_lines]).min()) < 78:
        return None  # the element column is needed (Biopython guesses otherwise)
    chars = _line_columns(buffer, starts[atom_lines], ends[atom_lines], _WIDTH)
    atoms = atom_lines  # one entry per ATOM record
    if (chars[:, 16] != ord(" ")).any():  # alternate locations: Biopython picks conformers
        return None
    try:
        # x, y, z as one (3n, 8) column; occupancy and B-factor as one (2n, 6) column
        xyz = _decimal(np.ascontiguousarray(chars[:, 30:54]).reshape(-1, 8), 0, 8).reshape(-1, 3)
        bfactor = _decimal(np.ascontiguousarray(chars[:, 54:66]).reshape(-1, 6), 0, 6).reshape(-1, 2)[:, 1]
        number = _integer(chars, 22, 26)
    except ValueError:
        return None
    # Names as integers (4 / 3 / 2 bytes), decoded only for their few distinct values.
    name_code = _columns(chars, 12, 16).view(np.uint32)
    resname_code = np.ascontiguousarray(chars[:, 16:20]).view(np.uint32).ravel()  # column 17 is blank
    element_code = _columns(chars, 76, 78).view(np.uint16)
    chain_code, code_code = chars[:, 21].astype(np.int64), chars[:, 26].astype(np.int64)
    names = _decode(name_code, 4)
    resnames = _decode(resname_code, 4)
    elements = _decode(element_code, 2)
    if not set(elements.values()) <= _HEAVY_ELEMENTS | {_HYDROGEN}:
        return None

    # Residues: runs of (chain, number, insertion code); each must be one run, of one residue name.
    starts_chain = _change_points(chain_code)
    starts_residue = _change_points(chain_code, number, code_code)
    residue = np.cumsum(starts_residue) - 1
    # (the distinct values of a column are those of its runs' first rows: the tests below need only those)
    if len(np.unique(chain_code[starts_chain])) != int(starts_chain.sum()):
        return None  # a chain id comes back after another chain
    keys = (chain_code << 48) + ((number + 2**31) << 8) + code_code
    if len(np.unique(keys[starts_residue])) != int(starts_residue.sum()):
        return None  # a residue comes back later in the file
    if (_change_points(resname_code)[~starts_residue]).any():
        return None  # two residue names at one position (point mutation): Biopython picks one
    if len(np.unique((residue.astype(np.int64) << 32) + name_code)) != len(atoms):
        return None  # an atom name repeated within a residue
    heavy = ~np.isin(element_code, [code for code, element in elements.items() if element == _HYDROGEN])
    first_atom = np.flatnonzero(starts_residue)
    n_residues = len(first_atom)
    residue_names = [resnames[c] for c in resname_code[first_atom].tolist()]
    distinct = np.array(sorted(names), dtype=np.uint32)
    inverse = np.searchsorted(distinct, name_code)
    atom_names = [names[c] for c in distinct.tolist()]

    def has(atom: str) -> np.ndarray:
        found = np.zeros(n_residues, dtype=bool)
        # distinct codes can decode to one name (" CA " and "CA  "): a flag per distinct code
        found[residue[np.array([name == atom for name in atom_names])[inverse]]] = True
        return found

    has_ca, backbone = has("CA"), has("N") & has("CA") & has("C")

    # Which residues are amino acids (data.structure._parent_name / _is_polymer_unknown for ATOM records);
    # a residue without CA is not observed.
    parent_of: list[str | None] = []
    for r, resname in enumerate(residue_names):
        if resname in water or not has_ca[r]:
            parent = None
        elif resname in rc.restype_3to1:
            parent = resname
        elif resname in parents:
            parent = parents[resname]
        elif resname == "UNK" or backbone[r]:
            parent = "UNK"
        else:
            parent = None
        parent_of.append(parent)

    # Atoms kept: heavy, of a kept residue, named (after renames) like an atom its parent residue has.
    slot_of_name = np.array([rc.atom_order.get(name, -1) for name in atom_names], dtype=np.int64)
    slot = slot_of_name[inverse]
    renamed = [r for r, resname in enumerate(residue_names) if resname in renames and parent_of[r] is not None]
    for r in renamed:  # MSE SE -> SD, SEC SE -> SG
        lo, hi = first_atom[r], first_atom[r + 1] if r + 1 < n_residues else len(atoms)
        for a in range(lo, hi):
            new_name = renames[residue_names[r]].get(atom_names[inverse[a]])
            if new_name is not None:
                slot[a] = rc.atom_order.get(new_name, -1)
    parent_names = sorted({p for p in parent_of if p is not None})
    allowed_slots = np.zeros((len(parent_names) + 1, 38), dtype=bool)  # last row: not kept; column 37: no slot
    for k, parent in enumerate(parent_names):
        for name in allowed.get(parent, unknown_atoms):
            allowed_slots[k, rc.atom_order[name]] = True
    parent_code = np.array([parent_names.index(p) if p is not None else len(parent_names) for p in parent_of])
    keep = heavy & allowed_slots[parent_code[residue], np.where(slot >= 0, slot, 37)]

    chains: list[tuple[str, dict]] = []
    chain_of_residue = _CHARACTERS[chain_code[first_atom]]
    codes = _CHARACTERS[code_code[first_atom]]  # insertion code of each residue
    kept_residue = np.array([p is not None for p in parent_of])
    for chain_id in dict.fromkeys(chain_of_residue.tolist()):
        kept = np.flatnonzero((chain_of_residue == chain_id) & kept_residue)
        if kept.size == 0:
            continue
        n = kept.size
        row_of_residue = np.full(n_residues, -1, dtype=np.int64)
        row_of_residue[kept] = np.arange(n)
        chosen = np.flatnonzero(keep & (row_of_residue[residue] >= 0))
        rows, columns = row_of_residue[residue[chosen]], slot[chosen]
        positions = np.zeros((n, 37, 3), np.float32)
        mask = np.zeros((n, 37), np.float32)
        bfac = np.zeros((n, 37), np.float32)
        positions[rows, columns] = xyz[chosen]
        mask[rows, columns] = 1.0
        bfac[rows, columns] = bfactor[chosen]
        sequence = "".join(rc.restype_3to1.get(parent_of[r], "X") for r in kept)
        modified: dict[str, int] = {}
        for r in kept:
            if residue_names[r] in parents:
                modified[residue_names[r]] = modified.get(residue_names[r], 0) + 1
        chains.append((chain_id, {
            "sequence": sequence,
            "aatype": np.array([rc.restype_order_with_x.get(c, rc.restype_num) for c in sequence], np.int64),
            "residue_index": np.arange(n, dtype=np.int64),
            "author_number": number[first_atom[kept]].astype(np.int64),
            "insertion_code": np.array([c.strip() for c in codes[kept].tolist()], dtype="<U1"),
            "atom37_positions": positions,
            "atom37_mask": mask,
            "b_factors": bfac,
            "modified_residues": modified,
        }))
    return pdb_id, chains
