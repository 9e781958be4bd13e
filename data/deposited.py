"""The deposited sequence of each protein chain, and where its observed residues sit in it.

A structure file observes only part of the chain that was deposited (disordered loops and termini have no
coordinates). AlphaFold2, OpenFold and ESMFold fold the deposited sequence and mask what was not observed,
so ``data.structure`` places every observed residue on its deposited position:

- mmCIF: ``_pdbx_poly_seq_scheme`` maps each sequence position (``seq_id``) to the author residue
  (``auth_seq_num`` + ``pdb_ins_code``; ``?`` where unobserved) and gives every position a PDB number
  (``pdb_seq_num``); the letters come from the entity's ``pdbx_seq_one_letter_code_can``.
- PDB: ``SEQRES`` lists the residue names but not which residue is which, so the observed residues are
  placed by their author numbers when those follow SEQRES exactly, else segment by segment (a segment ends at
  a chain break or a jump in numbering), maximising identical letters.

Placement fails (:class:`Unreconcilable`, with a one-line reason) when an observed residue has no position
or the letters disagree at more than ``max(MAX_MISMATCHES, MAX_MISMATCH_FRACTION · L)`` positions; callers
then fall back to the observed residues and record why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from data import residue_constants as rc

MAX_MISMATCHES = 2
MAX_MISMATCH_FRACTION = 0.05
_MAX_PEPTIDE_BOND = 2.0  # Å between C(i) and N(i+1); longer is a chain break
_N, _C = rc.atom_order["N"], rc.atom_order["C"]


class Unreconcilable(ValueError):
    """The deposited sequence cannot be matched with the observed residues (message = the reason)."""


@dataclass
class DepositedSequence:
    """One chain's deposited sequence (N positions).

    ``observed_keys``: mmCIF only, {(author number, insertion code): position} of the observed residues.
    ``numbers`` / ``codes``: mmCIF only, the PDB numbering of every position (unobserved ones included).
    ``alternatives``: per position, every letter deposited there (microheterogeneity gives several).
    """

    letters: str
    source: str  # "mmcif" or "seqres"
    alternatives: list[frozenset[str]]
    observed_keys: dict[tuple[int, str], int] | None = None
    numbers: list[int] | None = None
    codes: list[str] | None = None


@dataclass
class Placement:
    """Observed residues on the deposited sequence: ``positions`` (L,) strictly increasing indices into
    ``0..N-1``, the N-letter ``sequence``, and a unique author numbering of all N positions (observed ones keep
    theirs; ``None`` when no unique numbering exists)."""

    positions: np.ndarray
    sequence: str
    numbers: np.ndarray | None
    codes: np.ndarray | None
    mismatches: int


def one_letter(resname: str, parents: dict[str, str]) -> str:
    """Parent one-letter code of a residue name (MSE -> M), X when unknown."""
    resname = resname.strip().upper()
    parent = parents.get(resname, resname)
    return rc.restype_3to1.get(parent, "X")


# ----------------------------------------------------------------------------------------------- reading
def _column(mmcif: dict, key: str) -> list[str] | None:
    value = mmcif.get(key)
    if value is None:
        return None
    return value if isinstance(value, list) else [value]


def mmcif_sequences(mmcif: dict, parents: dict[str, str]) -> dict[str, DepositedSequence]:
    """{author chain id: deposited sequence} from ``_pdbx_poly_seq_scheme`` (empty when the file has none)."""
    columns = {name: _column(mmcif, f"_pdbx_poly_seq_scheme.{name}") for name in
               ("entity_id", "seq_id", "mon_id", "pdb_seq_num", "auth_seq_num", "pdb_strand_id", "pdb_ins_code")}
    if any(values is None for values in columns.values()):
        return {}
    canonical: dict[str, str] = {}
    for entity, code in zip(_column(mmcif, "_entity_poly.entity_id") or [],
                            _column(mmcif, "_entity_poly.pdbx_seq_one_letter_code_can") or []):
        canonical[entity] = re.sub(r"\s+", "", code or "")
    per_chain: dict[str, dict[int, list[int]]] = {}  # chain -> seq_id -> scheme rows (several if heterogeneous)
    for row, (strand, seq_id) in enumerate(zip(columns["pdb_strand_id"], columns["seq_id"])):
        per_chain.setdefault(strand, {}).setdefault(int(seq_id), []).append(row)
    sequences = {}
    for strand, by_seq_id in per_chain.items():
        seq_ids = sorted(by_seq_id)
        entity = columns["entity_id"][by_seq_id[seq_ids[0]][0]]
        can = canonical.get(entity, "")
        letters, alternatives, numbers, codes, observed = [], [], [], [], {}
        for position, seq_id in enumerate(seq_ids):
            rows = by_seq_id[seq_id]
            names = {one_letter(columns["mon_id"][r], parents) for r in rows}
            # The canonical code spells each sequence position once; a mismatched length means it is unusable.
            letter = can[seq_id - 1] if len(can) == len(seq_ids) and seq_ids[-1] == len(can) else None
            letters.append(letter if letter else one_letter(columns["mon_id"][rows[0]], parents))
            alternatives.append(frozenset(names | {letters[-1]}))
            first = rows[0]
            numbers.append(int(columns["pdb_seq_num"][first]))
            codes.append(_code(columns["pdb_ins_code"][first]))
            for r in rows:
                if columns["auth_seq_num"][r] not in ("?", "."):
                    observed[(int(columns["auth_seq_num"][r]), _code(columns["pdb_ins_code"][r]))] = position
        sequences[strand] = DepositedSequence(
            letters="".join(letters).upper(), source="mmcif", alternatives=alternatives,
            observed_keys=observed, numbers=numbers, codes=codes,
        )
    return sequences


def _code(value: str) -> str:
    value = (value or "").strip()
    return "" if value in ("?", ".") else value


def _record_lines(text: str, record: str) -> list[str]:
    """The lines of ``text`` that start with ``record`` (without their newline), in file order.

    What ``re.findall("^" + record + ".*", text, re.M)`` returns, by substring search: a multiline ``^`` tests
    every position of the text, ~10x slower on a file of atom records.
    """
    marker = "\n" + record
    start = 0 if text.startswith(record) else text.find(marker) + 1
    if start == 0 and not text.startswith(record):
        return []
    lines = []
    while True:
        end = text.find("\n", start)
        if end < 0:
            lines.append(text[start:])
            return lines
        lines.append(text[start:end])
        start = text.find(marker, end) + 1  # the newline at ``end`` may itself start the next one
        if start == 0:
            return lines


def seqres_sequences(text: str, parents: dict[str, str]) -> dict[str, DepositedSequence]:
    """{chain id: deposited sequence} from the ``SEQRES`` records of a PDB file (empty when there are none)."""
    names: dict[str, list[str]] = {}
    for line in _record_lines(text, "SEQRES"):
        names.setdefault(line[11:12].strip(), []).extend(line[19:].split())
    sequences = {}
    # Once per distinct name / letter: a chain spells ~20 of them hundreds of times.
    letter_of = {name: one_letter(name, parents) for name in set().union(*names.values())}
    alternative_of = {letter: frozenset(letter) for letter in set(letter_of.values())}
    for chain, residues in names.items():
        letters = "".join([letter_of[name] for name in residues])
        sequences[chain] = DepositedSequence(letters=letters, source="seqres",
                                             alternatives=[alternative_of[c] for c in letters])
    return sequences


# ----------------------------------------------------------------------------------------------- placing
def _allowed_mismatches(n_observed: int) -> int:
    return max(MAX_MISMATCHES, int(MAX_MISMATCH_FRACTION * n_observed))


def _differs(observed: str, deposited: frozenset[str]) -> bool:
    return observed != "X" and "X" not in deposited and observed not in deposited


def _by_mmcif_keys(numbers: np.ndarray, codes: np.ndarray, deposited: DepositedSequence) -> np.ndarray:
    positions = []
    for number, code in zip(numbers.tolist(), codes.tolist()):
        position = deposited.observed_keys.get((int(number), str(code)))
        if position is None:
            raise Unreconcilable(f"residue {number}{code} is not in _pdbx_poly_seq_scheme")
        positions.append(position)
    return np.asarray(positions, dtype=np.int64)


def _by_numbering(letters: str, numbers: np.ndarray, codes: np.ndarray, deposited: str) -> np.ndarray | None:
    """Positions ``number - offset`` when one offset puts every observed residue on an identical letter."""
    if any(codes) or np.any(np.diff(numbers) <= 0):
        return None
    span = int(numbers[-1] - numbers[0])
    if span >= len(deposited):
        return None
    observed = np.frombuffer(letters.encode(), dtype=np.uint8)
    target = np.frombuffer(deposited.encode(), dtype=np.uint8)
    relative = numbers - numbers[0]
    numbered_from_one = int(numbers[0]) - 1  # the usual convention: residue 1 = first SEQRES residue
    candidates = range(len(deposited) - span)
    if numbered_from_one in candidates:
        candidates = [numbered_from_one, *(c for c in candidates if c != numbered_from_one)]
    for start in candidates:
        if np.array_equal(target[relative + start], observed):
            return relative + start
    return None


def _segments(numbers: np.ndarray, codes: np.ndarray, atom37: np.ndarray, atom37_mask: np.ndarray) -> list[int]:
    """Start index of each run of residues that is continuous in numbering and geometry."""
    starts = [0]
    for i in range(1, len(numbers)):
        step = int(numbers[i] - numbers[i - 1])
        continuous = step == 1 or (step == 0 and codes[i] != codes[i - 1])
        if continuous and atom37_mask[i - 1, _C] > 0 and atom37_mask[i, _N] > 0:
            continuous = float(np.linalg.norm(atom37[i, _N] - atom37[i - 1, _C])) <= _MAX_PEPTIDE_BOND
        if not continuous:
            starts.append(i)
    return starts


def _by_segments(letters: str, starts: list[int], deposited: DepositedSequence) -> np.ndarray:
    """Place the segments in order and without overlap so that the most letters agree.

    Dynamic programming over segment starts: ``score_k(s)`` = agreements of segment k at start s plus the best
    score of segments 0..k-1 ending at or before s. Ties go to the earliest start.
    """
    n = len(deposited.letters)
    if len(letters) > n:
        raise Unreconcilable(f"{len(letters)} observed residues but the deposited sequence has {n}")
    bounds = list(zip(starts, starts[1:] + [len(letters)]))
    agree = np.array([[not _differs(o, d) for d in deposited.alternatives] for o in letters], dtype=np.int64)
    impossible = -(10**9)
    best_before = np.zeros(n + 1, dtype=np.int64)  # best score of earlier segments ending at or before p
    scores = []
    for lo, hi in bounds:
        m = hi - lo
        count = n - m + 1
        window = np.zeros(count, dtype=np.int64)
        for j in range(m):
            window += agree[lo + j, j : j + count]
        score = window + best_before[:count]
        scores.append(score)
        best_before = np.concatenate([np.full(m, impossible), np.maximum.accumulate(score)])
    positions = np.zeros(len(letters), dtype=np.int64)
    limit = n  # the segment after this one starts here
    for (lo, hi), score in zip(reversed(bounds), reversed(scores)):
        m = hi - lo
        usable = score[: limit - m + 1]
        if usable.size == 0 or usable.max() < 0:
            raise Unreconcilable("the observed segments do not fit in the deposited sequence")
        start = int(np.argmax(usable))
        positions[lo:hi] = np.arange(start, start + m)
        limit = start
    return positions


def assign_numbers(positions: np.ndarray, numbers: np.ndarray, codes: np.ndarray, n: int
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """Author numbers for all ``n`` positions: observed ones keep theirs, unobserved runs continue from the
    residue before (or count down to the one after); insertion codes A, B, ... where a run does not fit
    between its neighbours. ``None`` when the result would not be unique."""
    out_numbers = np.zeros(n, dtype=np.int64)
    out_codes = np.full(n, "", dtype="<U1")
    known = np.zeros(n, dtype=bool)
    out_numbers[positions], out_codes[positions], known[positions] = numbers, codes, True
    taken = set(zip(numbers.tolist(), codes.tolist()))
    p = 0
    while p < n:
        if known[p]:
            p += 1
            continue
        q = p
        while q < n and not known[q]:
            q += 1
        run = q - p  # positions p..q-1 unobserved
        if p == 0 and q == n:
            out_numbers[:] = np.arange(1, n + 1)
            return out_numbers, out_codes
        if p == 0:
            out_numbers[:q] = out_numbers[q] - np.arange(run, 0, -1)
        elif q == n or out_numbers[q] - out_numbers[p - 1] > run:
            out_numbers[p:q] = out_numbers[p - 1] + np.arange(1, run + 1)
        elif run <= 26 and not out_codes[p - 1]:
            out_numbers[p:q] = out_numbers[p - 1]
            out_codes[p:q] = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:run])
        else:
            return None
        for i in range(p, q):
            key = (int(out_numbers[i]), str(out_codes[i]))
            if key in taken:
                return None
            taken.add(key)
        p = q
    return out_numbers, out_codes


def place(letters: str, numbers: np.ndarray, codes: np.ndarray, atom37: np.ndarray, atom37_mask: np.ndarray,
          deposited: DepositedSequence) -> Placement:
    """Where each observed residue (``letters``, author ``numbers``/``codes``, coordinates) sits in
    ``deposited``. Raises :class:`Unreconcilable` with the reason."""
    if not deposited.letters:
        raise Unreconcilable("the deposited sequence is empty")
    if deposited.observed_keys is not None:
        positions = _by_mmcif_keys(numbers, codes, deposited)
    elif letters == deposited.letters:
        positions = np.arange(len(letters), dtype=np.int64)
    else:
        positions = _by_numbering(letters, numbers, codes, deposited.letters)
        if positions is None:
            positions = _by_segments(letters, _segments(numbers, codes, atom37, atom37_mask), deposited)
    if np.any(np.diff(positions) <= 0):
        raise Unreconcilable("observed residues are not in deposited-sequence order (or share a position)")
    mismatched = [i for i, p in enumerate(positions.tolist()) if _differs(letters[i], deposited.alternatives[p])]
    if len(mismatched) > _allowed_mismatches(len(letters)):
        first = mismatched[0]
        raise Unreconcilable(
            f"{len(mismatched)} of {len(letters)} observed residues differ from the deposited sequence "
            f"(first: {letters[first]}{numbers[first]}{codes[first]} vs "
            f"{deposited.letters[positions[first]]} at position {positions[first] + 1})"
        )
    sequence = list(deposited.letters)
    for i, p in enumerate(positions.tolist()):
        # Observed letters win where the file has several (microheterogeneity) or the file knows the parent
        # of a residue the deposited sequence calls X; the atoms were read for that residue type.
        if letters[i] != "X" and (letters[i] in deposited.alternatives[p] or sequence[p] == "X"):
            sequence[p] = letters[i]
    if deposited.numbers is not None:
        full_numbers = np.asarray(deposited.numbers, dtype=np.int64)
        full_codes = np.asarray(deposited.codes, dtype="<U1")
        full_numbers[positions], full_codes[positions] = numbers, codes
        keys = set(zip(full_numbers.tolist(), full_codes.tolist()))
        numbering = (full_numbers, full_codes) if len(keys) == len(full_numbers) else None
    else:
        numbering = assign_numbers(positions, numbers, codes, len(deposited.letters))
    return Placement(positions=positions, sequence="".join(sequence),
                     numbers=None if numbering is None else numbering[0],
                     codes=None if numbering is None else numbering[1], mismatches=len(mismatched))
