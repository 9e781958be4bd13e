"""Compiled (numba) loops for the hot parts of ``pipeline.metrics``; imported only through
``metrics._kernels()``, which falls back to the NumPy code when numba is missing or switched off.

Each kernel does exactly the arithmetic of its NumPy counterpart in the same order (float64 throughout), so
lDDT counts are identical; the point is one pass over the data instead of one NumPy pass per operation
(gathers, differences, compares and bincounts over ~10^5-10^6 pairs each). ``cache=True`` keeps the
machine code in ``__pycache__`` (compiled once per machine, then loaded in ~0.1 s).
The TM-score kernels use ``error_model="numpy"``: numba's default checks every float division for zero (to
raise ZeroDivisionError), and that branch keeps LLVM from vectorising the TM sum (~2x slower); every divisor
there is positive or its result is checked for finiteness.
"""

from __future__ import annotations

import numba
import numpy as np


_BLOCK = 8  # consecutive atoms per block of the pair search (a residue's worth)


@numba.njit(cache=True, nogil=True)
def contact_pairs(coords: np.ndarray, present: np.ndarray, group: np.ndarray, n_batch: int, n_atoms: int,
                  cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of metrics._contact_pairs, in its order (i, then j ascending): atoms i < j of one batch
    element, of different groups, both present, d_ref <= cutoff.

    coords (B * M, 3) float64, present / group (B * M,). Atoms are taken in blocks of consecutive ones; a
    block whose bounding sphere lies beyond the cutoff from atom i (by more than a rounding margin: the
    triangle inequality then puts every atom of it beyond) is skipped. Every other distance is computed
    directly, in the arithmetic of metrics._distances, so the pairs and d_ref are the same numbers.
    """
    n_blocks = (n_atoms + _BLOCK - 1) // _BLOCK
    centre = np.zeros((n_batch * n_blocks, 3))
    reach = np.full(n_batch * n_blocks, -1.0)  # radius of the block's present atoms; -1: none present
    for b in range(n_batch):
        for block in range(n_blocks):
            lo, hi = b * n_atoms + block * _BLOCK, b * n_atoms + min(n_atoms, (block + 1) * _BLOCK)
            count = 0
            c = np.zeros(3)
            for atom in range(lo, hi):
                if present[atom]:
                    c += coords[atom]
                    count += 1
            if count == 0:
                continue
            c /= count
            radius = 0.0
            for atom in range(lo, hi):
                if present[atom]:
                    radius = max(radius, np.sqrt(((coords[atom] - c) ** 2).sum()))
            centre[b * n_blocks + block] = c
            reach[b * n_blocks + block] = radius
    # Two passes, counting then writing (each array written once: no growing inside the loop).
    n = _contact_scan(coords, present, group, n_batch, n_atoms, cutoff, centre, reach,
                      np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0), False)
    found_i, found_j, found_d = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64), np.empty(n)
    _contact_scan(coords, present, group, n_batch, n_atoms, cutoff, centre, reach, found_i, found_j, found_d, True)
    return found_i, found_j, found_d


@numba.njit(cache=True, nogil=True)
def _contact_scan(coords: np.ndarray, present: np.ndarray, group: np.ndarray, n_batch: int, n_atoms: int,
                  cutoff: float, centre: np.ndarray, reach: np.ndarray, found_i: np.ndarray, found_j: np.ndarray,
                  found_d: np.ndarray, write: bool) -> int:
    """The pairs of contact_pairs: their number, and with ``write`` the pairs themselves into found_*."""
    n_blocks = (n_atoms + _BLOCK - 1) // _BLOCK
    cutoff2 = cutoff * cutoff * (1.0 + 1e-9)  # beyond this squared distance the square root is > cutoff too
    n = 0
    for b in range(n_batch):
        base = b * n_atoms
        for a in range(base, base + n_atoms):
            if not present[a]:
                continue
            x, y, z = coords[a, 0], coords[a, 1], coords[a, 2]
            own = group[a]
            for block in range((a + 1 - base) // _BLOCK, n_blocks):
                k = b * n_blocks + block
                if reach[k] < 0:
                    continue
                far = cutoff + reach[k] + 1e-6  # the margin covers the rounding of these few operations
                cx, cy, cz = x - centre[k, 0], y - centre[k, 1], z - centre[k, 2]
                if cx * cx + cy * cy + cz * cz > far * far:
                    continue
                for other in range(max(a + 1, base + block * _BLOCK), base + min(n_atoms, (block + 1) * _BLOCK)):
                    dx = x - coords[other, 0]
                    dy = y - coords[other, 1]
                    dz = z - coords[other, 2]
                    d2 = dx * dx + dy * dy + dz * dz
                    if d2 > cutoff2 or not present[other] or group[other] == own:
                        continue
                    d = np.sqrt(d2)  # metrics._distances: ((dx^2 + dy^2) + dz^2) ** 0.5
                    if d <= cutoff:
                        if write:
                            found_i[n] = a
                            found_j[n] = other
                            found_d[n] = d
                        n += 1
    return n


@numba.njit(cache=True, nogil=True)
def _row_passes(scratch: np.ndarray, coords: np.ndarray, atom: int, partners: np.ndarray, present: np.ndarray,
                d_ref: np.ndarray, lo: int, m: int, thresholds: np.ndarray) -> None:
    """Thresholds passed by the m pairs (atom, partners[lo + k]) at reference distances d_ref[lo + k], the one
    lDDT test of the kernels; written to scratch[5, :m] (0 where the partner is not modelled; the caller
    checks ``atom``).

    The partners are gathered into contiguous rows first (scratch 0-2: x, y, z, 3: modelled, 4: |d_ref -
    d_model|): the loops after that have no indirection and no branch, so LLVM vectorises the square roots
    and compares that the scalar loop spent most of its time in. d_model is ((dx^2 + dy^2) + dz^2) ** 0.5
    with d = coords[atom] - coords[partner], as metrics._distances (a flipped sign squares the same).
    """
    for k in range(m):
        partner = partners[lo + k]
        scratch[0, k] = coords[partner, 0]
        scratch[1, k] = coords[partner, 1]
        scratch[2, k] = coords[partner, 2]
        scratch[3, k] = present[partner]
    x, y, z = coords[atom, 0], coords[atom, 1], coords[atom, 2]
    xs, ys, zs, ok, diff, passed = scratch[0], scratch[1], scratch[2], scratch[3], scratch[4], scratch[5]
    for k in range(m):
        dx = x - xs[k]
        dy = y - ys[k]
        dz = z - zs[k]
        diff[k] = abs(d_ref[lo + k] - np.sqrt(dx * dx + dy * dy + dz * dz))
        passed[k] = 0.0
    for t in range(thresholds.shape[0]):
        limit = thresholds[t]
        for k in range(m):
            passed[k] += diff[k] <= limit
    for k in range(m):
        passed[k] *= ok[k]


@numba.njit(cache=True, nogil=True)
def _scratch(starts: np.ndarray) -> np.ndarray:
    """Buffers of _row_passes for the longest row."""
    width = 1
    for r in range(starts.shape[0] - 1):
        width = max(width, starts[r + 1] - starts[r])
    return np.empty((6, width))


@numba.njit(cache=True, nogil=True)
def lddt_pair_counts(coords: np.ndarray, present: np.ndarray, starts: np.ndarray, partners: np.ndarray,
                     d_ref: np.ndarray, thresholds: np.ndarray, preserved: np.ndarray, per_atom: bool) -> float:
    """Thresholds passed by the reference pairs in the model (metrics._lddt_counts); returns their sum.

    coords (M, 3) float64 model atoms; present (M,) bool (modelled); the pairs as rows (metrics._pair_rows):
    atom a pairs with ``partners[starts[a]:starts[a + 1]]`` (int32), at reference distances ``d_ref`` (same
    order). ``per_atom``: also add each pair's count to ``preserved`` (M,) of both its atoms.
    """
    scratch = _scratch(starts)
    total = 0.0
    for a in range(starts.shape[0] - 1):
        if not present[a]:
            continue
        lo, m = starts[a], starts[a + 1] - starts[a]
        _row_passes(scratch, coords, a, partners, present, d_ref, lo, m, thresholds)
        row = 0.0
        for k in range(m):
            row += scratch[5, k]
        total += row
        if per_atom:
            for k in range(m):
                preserved[partners[lo + k]] += scratch[5, k]
            preserved[a] += row
    return total


@numba.njit(cache=True, nogil=True)
def lddt_symmetry_gain(coords: np.ndarray, present: np.ndarray, others: np.ndarray, starts: np.ndarray,
                       own: np.ndarray, swapped: np.ndarray, d_ref: np.ndarray, thresholds: np.ndarray,
                       group: np.ndarray, gain: np.ndarray) -> None:
    """The symmetry test of metrics._resolve_symmetry (metrics._symmetry_pairs' rows): adds to ``gain[group]``
    the thresholds each pair passes with its symmetric atom read as ``swapped`` minus those it passes read
    as ``own`` (counts are integers: the sum of the differences is exactly the difference of the sums).

    coords (N, 3) float64 model atoms (flat atom37), present (N,) bool. Row r: the non-symmetric atom
    ``others[r]`` and the symmetric atoms of pairs ``starts[r]:starts[r + 1]``; d_ref their reference
    distances, group their residues.
    """
    scratch = _scratch(starts)
    kept = np.empty(scratch.shape[1])
    for r in range(others.shape[0]):
        other = others[r]
        if not present[other]:
            continue
        lo, m = starts[r], starts[r + 1] - starts[r]
        _row_passes(scratch, coords, other, own, present, d_ref, lo, m, thresholds)
        kept[:m] = scratch[5, :m]
        _row_passes(scratch, coords, other, swapped, present, d_ref, lo, m, thresholds)
        for k in range(m):
            gain[group[lo + k]] += scratch[5, k] - kept[k]


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"}, error_model="numpy")
def _tm_sum(row: np.ndarray, d02: float) -> float:
    """sum 1 / (d0^2 + d^2) over a row of squared distances; reassociated (vectorised): the order of the
    additions differs from NumPy's pairwise sum only in rounding."""
    total = 0.0
    for m in range(row.shape[0]):
        total += 1.0 / (d02 + row[m])
    return total


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"}, error_model="numpy")
def _gdt_counts(dist2: np.ndarray, c0: float, c1: float, c2: float, c3: float, c4: float) -> tuple:
    """How many squared distances are <= each squared GDT cutoff (counted in floats: exact below 2^53, and
    float sums vectorise where int64 ones do not)."""
    n0 = n1 = n2 = n3 = n4 = 0.0
    for m in range(dist2.shape[0]):
        d2 = dist2[m]
        n0 += 1.0 if d2 <= c0 else 0.0
        n1 += 1.0 if d2 <= c1 else 0.0
        n2 += 1.0 if d2 <= c2 else 0.0
        n3 += 1.0 if d2 <= c3 else 0.0
        n4 += 1.0 if d2 <= c4 else 0.0
    return int(n0), int(n1), int(n2), int(n3), int(n4)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _pair_set(dist2: np.ndarray, limit2: float, hash_weights: np.ndarray, mask: np.ndarray) -> tuple:
    """mask[m] = dist2[m] < limit2; returns the set's key (wrapping sum of its pairs' hash weights) and size."""
    key = np.int64(0)
    size = 0
    for m in range(dist2.shape[0]):
        inside = dist2[m] < limit2
        mask[m] = inside
        key += hash_weights[m] * inside
        size += inside
    return key, size


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _third_smallest(row: np.ndarray) -> float:
    """The third smallest entry of ``row`` (ties counted; = np.partition(row, 2)[2]) in one pass, no sort."""
    a = b = c = np.inf
    for m in range(row.shape[0]):
        v = row[m]
        if v < c:
            if v < b:
                c = b
                if v < a:
                    b, a = a, v
                else:
                    b = v
            else:
                c = v
    return c


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _seen_before(table: np.ndarray, used: np.ndarray, key: np.int64) -> bool:
    """Set membership with insertion: True if ``key`` was in the open-addressing table, else adds it."""
    mask = table.shape[0] - 1
    slot = key & mask
    while used[slot]:
        if table[slot] == key:
            return True
        slot = (slot + 1) & mask
    used[slot] = True
    table[slot] = key
    return False


@numba.njit(cache=True, nogil=True, error_model="numpy")
def tm_search(x: np.ndarray, y: np.ndarray, d0: float, d0_search: float, seed_lengths: np.ndarray, max_iter: int,
              cut2: np.ndarray, hash_weights: np.ndarray, min_slope: float, gdt_best: np.ndarray) -> tuple:
    """The whole Zhang-Skolnick search of metrics._tm_search for one pair, in one compiled call.

    x, y (n, 3) float64 centred aligned pairs; seed_lengths: fragment lengths (metrics._seed_lengths);
    cut2 (5,) squared GDT cutoffs; hash_weights (n,) int64 (a pair set's key is the wrapping sum of its
    pairs' weights); gdt_best (5,) int64 receives the best GDT counts. Returns (best TM sum, RMSD of the
    all-pairs fit, number of fits the closed form flagged and the SVD solved); TM-score = sum * d0^2 / L_ref.

    Same rules as the NumPy search: every window of every length is a seed; each round fits every live
    candidate (:func:`_fit_row`), scores it (:func:`_score_candidate`: GDT counts, TM sum, next pair set), and
    follows each changed pair set once (sets reached before have a known future). A followed candidate's
    sums are its previous sums plus the pairs that entered minus those that left (later rounds: a few), or
    all pairs' sums minus those outside the set when fewer (a seed's first set), so a round costs a few
    passes over the pairs per candidate and no (candidates x pairs) GEMM.
    """
    n = x.shape[0]
    feats = np.empty((n, 16))  # per pair: x y^T (9), x (3), y (3), 1 - the sums a weighted Kabsch fit needs
    for m in range(n):
        for a in range(3):
            for b in range(3):
                feats[m, 3 * a + b] = x[m, a] * y[m, b]
            feats[m, 9 + a] = x[m, a]
            feats[m, 12 + a] = y[m, a]
        feats[m, 15] = 1.0
    prefix = np.zeros((n + 1, 16))
    for m in range(n):
        for k in range(16):
            prefix[m + 1, k] = prefix[m, k] + feats[m, k]
    n_rows = 0
    for length in seed_lengths:
        n_rows += n - length + 1
    sums = np.empty((n_rows, 16))
    prev = np.zeros((n_rows, n), dtype=np.uint8)  # each candidate's pair set (seeds: their window)
    row = 0
    for length in seed_lengths:
        for start in range(n - length + 1):
            for k in range(16):
                sums[row, k] = prefix[start + length, k] - prefix[start, k]
            prev[row, start:start + length] = 1
            row += 1
    mask = np.empty((n_rows, n), dtype=np.uint8)
    keys, n_diff, set_size = np.empty(n_rows, dtype=np.int64), np.empty(n_rows, dtype=np.int64), np.empty(n_rows, dtype=np.int64)
    changed = np.empty(n_rows, dtype=np.bool_)
    rot, trans = np.empty((n_rows, 9)), np.empty((n_rows, 3))
    capacity = 1
    while capacity < 2 * n_rows * (max_iter + 1):  # more slots than sets the search can ever follow
        capacity *= 2
    table, used = np.empty(capacity, dtype=np.int64), np.zeros(capacity, dtype=np.bool_)
    dist2, work = np.empty(n), np.empty((3, 4, 4))
    xs, ys, zs = x[:, 0].copy(), x[:, 1].copy(), x[:, 2].copy()
    us, vs, ws = y[:, 0].copy(), y[:, 1].copy(), y[:, 2].copy()
    best_sum, rmsd, n_svd = -1.0, 0.0, 0
    d02 = d0 * d0
    for step in range(max_iter + 1):
        base = d0_search + (1.0 if step > 0 else -1.0)
        widen = n > 3 and step < max_iter
        for c in range(n_rows):
            if not _fit_row(sums[c], min_slope, rot[c], trans[c], work):
                _fit_row_svd(sums[c], rot[c], trans[c])
                n_svd += 1
            best_sum = _score_candidate(rot[c], trans[c], xs, ys, zs, us, vs, ws, d02, cut2, base, widen,
                                        hash_weights, dist2, mask[c], prev[c], gdt_best, best_sum, step > 0,
                                        keys[c:c + 1], changed[c:c + 1], n_diff[c:c + 1],
                                        set_size[c:c + 1])
            if step == 0 and c == 0:  # seed 0 is the window of all n pairs: the RMSD fit
                total = 0.0
                for m in range(n):
                    total += dist2[m]
                rmsd = np.sqrt(total / n)
        if step == max_iter:
            break
        follow = 0
        for c in range(n_rows):  # compact the followed candidates into rows 0..follow-1 (follow <= c)
            if not changed[c] or _seen_before(table, used, keys[c]):
                continue
            outside = n - set_size[c]
            if n_diff[c] <= outside:  # few pairs entered or left: the parent's sums, updated by them
                for k in range(16):
                    sums[follow, k] = sums[c, k]
                if n_diff[c] > 0:
                    for m in range(n):
                        if mask[c, m] != prev[c, m]:
                            sign = 1.0 if mask[c, m] else -1.0
                            for k in range(16):
                                sums[follow, k] += sign * feats[m, k]
            else:  # few pairs outside the set (a seed's first set, typically): all pairs' sums minus those
                for k in range(16):
                    sums[follow, k] = prefix[n, k]
                for m in range(n):
                    if not mask[c, m]:
                        for k in range(16):
                            sums[follow, k] -= feats[m, k]
            prev[follow] = mask[c]
            follow += 1
        if follow == 0:
            break
        n_rows = follow
    return best_sum, rmsd, n_svd


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _score_candidate(r: np.ndarray, t: np.ndarray, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray, us: np.ndarray,
                     vs: np.ndarray, ws: np.ndarray, d02: float, cut2: np.ndarray, base: float, widen: bool,
                     hash_weights: np.ndarray, dist2: np.ndarray, mask: np.ndarray, prev: np.ndarray,
                     gdt_best: np.ndarray, best_sum: float, has_prev: bool, key_out: np.ndarray,
                     changed_out: np.ndarray, n_diff_out: np.ndarray, size_out: np.ndarray) -> float:
    """One candidate fit (r (9,), t (3,)) of one round: squared distances |R x + t - y|^2 into dist2, GDT
    counts (maxima into gdt_best), the TM sum, and the next pair set into mask (d < base, widened by 0.5 A
    until >= 3 pairs when ``widen``), its key, and whether it differs from ``prev``. Returns the best TM
    sum so far."""
    n = xs.shape[0]
    r00, r01, r02, r10, r11, r12, r20, r21, r22 = r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]
    t0, t1, t2 = t[0], t[1], t[2]
    c0, c1, c2, c3, c4 = cut2[0], cut2[1], cut2[2], cut2[3], cut2[4]
    base2 = base * base
    # Branch-free loops over contiguous columns (vectorised by LLVM).
    for m in range(n):
        px, py, pz = xs[m], ys[m], zs[m]
        dx = r00 * px + r01 * py + r02 * pz + t0 - us[m]
        dy = r10 * px + r11 * py + r12 * pz + t1 - vs[m]
        dz = r20 * px + r21 * py + r22 * pz + t2 - ws[m]
        dist2[m] = dx * dx + dy * dy + dz * dz
    n0, n1, n2, n3, n4 = _gdt_counts(dist2, cut2[0], cut2[1], cut2[2], cut2[3], cut2[4])
    gdt_best[0] = max(gdt_best[0], n0)
    gdt_best[1] = max(gdt_best[1], n1)
    gdt_best[2] = max(gdt_best[2], n2)
    gdt_best[3] = max(gdt_best[3], n3)
    gdt_best[4] = max(gdt_best[4], n4)
    best_sum = max(best_sum, _tm_sum(dist2, d02))
    key, close = _pair_set(dist2, base * base, hash_weights, mask)
    if widen and close < 3:
        third = np.sqrt(_third_smallest(dist2))
        cutoff = base + 0.5 * (np.floor((third - base) / 0.5) + 1.0)
        key, close = _pair_set(dist2, cutoff * cutoff, hash_weights, mask)
    differing = 0
    for m in range(n):
        differing += mask[m] != prev[m]
    n_diff_out[0] = differing
    size_out[0] = close
    key_out[0] = key
    changed_out[0] = differing > 0 or not has_prev
    return best_sum


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _minors4(m: np.ndarray) -> tuple:
    """The 2x2 minors of a 4x4 ``m`` from rows (0, 1) and from rows (2, 3), columns (i, j) i < j in the order
    01, 02, 03, 12, 13, 23: det m = sum of the Laplace products over complementary column pairs."""
    s0 = m[0, 0] * m[1, 1] - m[1, 0] * m[0, 1]
    s1 = m[0, 0] * m[1, 2] - m[1, 0] * m[0, 2]
    s2 = m[0, 0] * m[1, 3] - m[1, 0] * m[0, 3]
    s3 = m[0, 1] * m[1, 2] - m[1, 1] * m[0, 2]
    s4 = m[0, 1] * m[1, 3] - m[1, 1] * m[0, 3]
    s5 = m[0, 2] * m[1, 3] - m[1, 2] * m[0, 3]
    c0 = m[2, 0] * m[3, 1] - m[3, 0] * m[2, 1]
    c1 = m[2, 0] * m[3, 2] - m[3, 0] * m[2, 2]
    c2 = m[2, 0] * m[3, 3] - m[3, 0] * m[2, 3]
    c3 = m[2, 1] * m[3, 2] - m[3, 1] * m[2, 2]
    c4 = m[2, 1] * m[3, 3] - m[3, 1] * m[2, 3]
    c5 = m[2, 2] * m[3, 3] - m[3, 2] * m[2, 3]
    return s0, s1, s2, s3, s4, s5, c0, c1, c2, c3, c4, c5


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _det4(m: np.ndarray) -> float:
    """Determinant of a 4x4 ``m`` by Laplace expansion along rows (0, 1)."""
    s0, s1, s2, s3, s4, s5, c0, c1, c2, c3, c4, c5 = _minors4(m)
    return s0 * c5 - s1 * c4 + s2 * c3 + s3 * c2 - s4 * c1 + s5 * c0


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _adjugate4(m: np.ndarray, out: np.ndarray) -> None:
    """out = adj(m) (the transposed cofactor matrix, m adj(m) = det(m) I) of a 4x4 ``m``, from its 2x2 minors:
    each 3x3 cofactor expands along its row in 0..1 or 2..3 into one of them."""
    s0, s1, s2, s3, s4, s5, c0, c1, c2, c3, c4, c5 = _minors4(m)
    out[0, 0] = m[1, 1] * c5 - m[1, 2] * c4 + m[1, 3] * c3
    out[0, 1] = -m[0, 1] * c5 + m[0, 2] * c4 - m[0, 3] * c3
    out[0, 2] = m[3, 1] * s5 - m[3, 2] * s4 + m[3, 3] * s3
    out[0, 3] = -m[2, 1] * s5 + m[2, 2] * s4 - m[2, 3] * s3
    out[1, 0] = -m[1, 0] * c5 + m[1, 2] * c2 - m[1, 3] * c1
    out[1, 1] = m[0, 0] * c5 - m[0, 2] * c2 + m[0, 3] * c1
    out[1, 2] = -m[3, 0] * s5 + m[3, 2] * s2 - m[3, 3] * s1
    out[1, 3] = m[2, 0] * s5 - m[2, 2] * s2 + m[2, 3] * s1
    out[2, 0] = m[1, 0] * c4 - m[1, 1] * c2 + m[1, 3] * c0
    out[2, 1] = -m[0, 0] * c4 + m[0, 1] * c2 - m[0, 3] * c0
    out[2, 2] = m[3, 0] * s4 - m[3, 1] * s2 + m[3, 3] * s0
    out[2, 3] = -m[2, 0] * s4 + m[2, 1] * s2 - m[2, 3] * s0
    out[3, 0] = -m[1, 0] * c3 + m[1, 1] * c1 - m[1, 2] * c0
    out[3, 1] = m[0, 0] * c3 - m[0, 1] * c1 + m[0, 2] * c0
    out[3, 2] = -m[3, 0] * s3 + m[3, 1] * s1 - m[3, 2] * s0
    out[3, 3] = m[2, 0] * s3 - m[2, 1] * s1 + m[2, 2] * s0


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _fit_row(sums: np.ndarray, min_slope: float, rot: np.ndarray, trans: np.ndarray, work: np.ndarray) -> bool:
    """Weighted Kabsch fit from one candidate's sums [sum w x y^T (9), sum w x, sum w y, sum w] (16,).

    The rotation is the Horn / Theobald quaternion closed form of metrics._rotation_closed_form: the largest
    root lambda_1 of K's characteristic polynomial by Newton's method from an upper bound, the eigenvector
    from adj(lambda_1 I - K) refined once. Returns False where the caller must solve by SVD (zero or
    rank-deficient covariance, near-degenerate top eigenvalue, no convergence) - the same test as the NumPy
    code. Writes rot (9,) row-major R and trans (3,); weight 0 gives R = I, t = 0. work: (3, 4, 4) scratch.
    """
    key, shifted, adj = work[0], work[1], work[2]
    weight = sums[15]
    if weight <= 0:
        for a in range(9):
            rot[a] = 1.0 if a % 4 == 0 else 0.0
        trans[0] = trans[1] = trans[2] = 0.0
        return True
    xm0, xm1, xm2 = sums[9] / weight, sums[10] / weight, sums[11] / weight
    ym0, ym1, ym2 = sums[12] / weight, sums[13] / weight, sums[14] / weight
    hxx, hxy, hxz = sums[0] - weight * xm0 * ym0, sums[1] - weight * xm0 * ym1, sums[2] - weight * xm0 * ym2
    hyx, hyy, hyz = sums[3] - weight * xm1 * ym0, sums[4] - weight * xm1 * ym1, sums[5] - weight * xm1 * ym2
    hzx, hzy, hzz = sums[6] - weight * xm2 * ym0, sums[7] - weight * xm2 * ym1, sums[8] - weight * xm2 * ym2
    key[0, 0] = hxx + hyy + hzz
    key[1, 1] = hxx - hyy - hzz
    key[2, 2] = -hxx + hyy - hzz
    key[3, 3] = -hxx - hyy + hzz
    key[0, 1] = key[1, 0] = hyz - hzy
    key[0, 2] = key[2, 0] = hzx - hxz
    key[0, 3] = key[3, 0] = hxy - hyx
    key[1, 2] = key[2, 1] = hxy + hyx
    key[1, 3] = key[3, 1] = hzx + hxz
    key[2, 3] = key[3, 2] = hyz + hzy
    norm2 = (hxx * hxx + hxy * hxy + hxz * hxz + hyx * hyx + hyy * hyy + hyz * hyz
             + hzx * hzx + hzy * hzy + hzz * hzz)
    cof0 = hyy * hzz - hyz * hzy
    cof1 = hyz * hzx - hyx * hzz
    cof2 = hyx * hzy - hyy * hzx
    cof_norm2 = (cof0 * cof0 + cof1 * cof1 + cof2 * cof2
                 + (hxz * hzy - hxy * hzz) ** 2 + (hxx * hzz - hxz * hzx) ** 2 + (hxy * hzx - hxx * hzy) ** 2
                 + (hxy * hyz - hxz * hyy) ** 2 + (hxz * hyx - hxx * hyz) ** 2 + (hxx * hyy - hxy * hyx) ** 2)
    c2 = -2.0 * norm2
    c1 = -8.0 * (hxx * cof0 + hxy * cof1 + hxz * cof2)
    c0 = _det4(key)
    lam = np.sqrt(norm2 + 2.0 * np.sqrt(3.0 * cof_norm2)) * (1.0 + 1e-6)
    for _ in range(100):
        slope = (4.0 * lam * lam + 2.0 * c2) * lam + c1
        step = (((lam * lam + c2) * lam + c1) * lam + c0) / slope
        lam = lam - step
        if not (abs(step) > 1e-9 * lam and slope > min_slope * lam * lam * lam):
            break
    slope = (4.0 * lam * lam + 2.0 * c2) * lam + c1
    step = (((lam * lam + c2) * lam + c1) * lam + c0) / slope
    lam = lam - step
    converged = abs(step) <= 1e-12 * lam
    for a in range(4):
        for b in range(4):
            shifted[a, b] = -key[a, b]
        shifted[a, a] += lam
    _adjugate4(shifted, adj)
    column = 0
    for a in range(1, 4):
        if adj[a, a] > adj[column, column]:
            column = a
    q0 = adj[0, 0] * adj[0, column] + adj[0, 1] * adj[1, column] + adj[0, 2] * adj[2, column] + adj[0, 3] * adj[3, column]
    q1 = adj[1, 0] * adj[0, column] + adj[1, 1] * adj[1, column] + adj[1, 2] * adj[2, column] + adj[1, 3] * adj[3, column]
    q2 = adj[2, 0] * adj[0, column] + adj[2, 1] * adj[1, column] + adj[2, 2] * adj[2, column] + adj[2, 3] * adj[3, column]
    q3 = adj[3, 0] * adj[0, column] + adj[3, 1] * adj[1, column] + adj[3, 2] * adj[2, column] + adj[3, 3] * adj[3, column]
    norm = np.sqrt(q0 * q0 + q1 * q1 + q2 * q2 + q3 * q3)
    w, qx, qy, qz = q0 / norm, q1 / norm, q2 / norm, q3 / norm
    finite = np.isfinite(w) and np.isfinite(qx) and np.isfinite(qy) and np.isfinite(qz)
    rot[0] = w * w + qx * qx - qy * qy - qz * qz
    rot[4] = w * w - qx * qx + qy * qy - qz * qz
    rot[8] = w * w - qx * qx - qy * qy + qz * qz
    rot[1] = 2.0 * (qx * qy - w * qz)
    rot[3] = 2.0 * (qx * qy + w * qz)
    rot[2] = 2.0 * (qx * qz + w * qy)
    rot[6] = 2.0 * (qx * qz - w * qy)
    rot[5] = 2.0 * (qy * qz - w * qx)
    rot[7] = 2.0 * (qy * qz + w * qx)
    _set_translation(sums, rot, trans)
    return norm2 > 0 and converged and slope > min_slope * lam * lam * lam and finite


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _set_translation(sums: np.ndarray, rot: np.ndarray, trans: np.ndarray) -> None:
    """t = mean(y) - R mean(x) for weight sums[15] > 0."""
    weight = sums[15]
    xm0, xm1, xm2 = sums[9] / weight, sums[10] / weight, sums[11] / weight
    for a in range(3):
        trans[a] = sums[12 + a] / weight - (rot[3 * a] * xm0 + rot[3 * a + 1] * xm1 + rot[3 * a + 2] * xm2)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _fit_row_svd(sums: np.ndarray, rot: np.ndarray, trans: np.ndarray) -> None:
    """The fit of :func:`_fit_row` by SVD (metrics._rotation_svd), for the rows the closed form flags."""
    weight = sums[15]
    cov = np.empty((3, 3))
    for a in range(3):
        for b in range(3):
            cov[a, b] = sums[3 * a + b] - weight * (sums[9 + a] / weight) * (sums[12 + b] / weight)
    u, _, vh = np.linalg.svd(cov)
    v, ut = vh.T.copy(), u.T.copy()
    sign = np.sign(np.linalg.det(v @ ut))
    if sign == 0:
        sign = 1.0
    for b in range(3):
        v[b, 2] *= sign
    best = v @ ut
    for a in range(3):
        for b in range(3):
            rot[3 * a + b] = best[a, b]
    _set_translation(sums, rot, trans)
