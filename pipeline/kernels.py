"""Compiled (numba) loops for the hot parts of ``pipeline.metrics``; imported only through
``metrics._kernels()``, which falls back to the NumPy code when numba is missing or switched off.

Each kernel does exactly the arithmetic of its NumPy counterpart in the same order (float64 throughout), so
lDDT counts are identical; the point is one pass over the data instead of one NumPy pass per operation
(gathers, differences, compares and bincounts over ~10^5-10^6 pairs each). ``cache=True`` keeps the
machine code in ``__pycache__`` (compiled once per machine, then loaded in ~0.1 s).
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


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _tm_sum(row: np.ndarray, d02: float) -> float:
    """sum 1 / (d0^2 + d^2) over a row of squared distances; reassociated (vectorised): the order of the
    additions differs from NumPy's pairwise sum only in rounding."""
    total = 0.0
    for m in range(row.shape[0]):
        total += 1.0 / (d02 + row[m])
    return total


@numba.njit(cache=True, nogil=True)
def tm_round(rot: np.ndarray, trans: np.ndarray, x: np.ndarray, y: np.ndarray, d02: float, cut2: np.ndarray,
             base: float, widen: bool, prev: np.ndarray, has_prev: bool, hash_weights: np.ndarray,
             mask: np.ndarray, changed: np.ndarray, keys: np.ndarray, gdt_best: np.ndarray, best_sum: float) -> float:
    """One extension round of the TM-score search for every candidate fit (metrics._tm_search).

    rot (3, 3, C), trans (3, C): the candidates' superpositions; x, y (n, 3) centred aligned pairs. For each
    candidate: squared distances |R x + t - y|^2, the GDT counts (d^2 <= cut2[k], maxima into gdt_best), the
    TM sum of 1 / (d0^2 + d^2), and its next pair set in ``mask[c]`` (d < base, widened by 0.5 A until >= 3
    pairs when ``widen``). ``changed[c]``: the set differs from ``prev[c]`` (always True without prev);
    ``keys[c]``: a 64-bit hash of the set (wrapping sum of ``hash_weights`` over its pairs).
    Returns the largest TM sum (times d0^2 / L_ref that is the TM-score), at least ``best_sum`` (the best
    so far): a row whose upper bound from its distance counts cannot exceed it skips the division pass
    (the result is the same, the bound only saves work).
    """
    n_rows, n = rot.shape[2], x.shape[0]
    row = np.empty(n)
    best_tm = best_sum
    base2 = base * base
    # Upper bound of a row's TM sum: each pair counted at the smallest edge of its distance bin.
    b0, b1, b2, b3 = 1.0 / d02, 1.0 / (d02 + cut2[0]), 1.0 / (d02 + cut2[1]), 1.0 / (d02 + cut2[2])
    b4, b5, b6, b7 = 1.0 / (d02 + cut2[3]), 1.0 / (d02 + cut2[4]), 1.0 / (d02 + 144.0), 1.0 / (d02 + 256.0)
    c0, c1, c2, c3, c4 = cut2[0], cut2[1], cut2[2], cut2[3], cut2[4]
    xs, ys, zs = x[:, 0].copy(), x[:, 1].copy(), x[:, 2].copy()
    us, vs, ws = y[:, 0].copy(), y[:, 1].copy(), y[:, 2].copy()
    for c in range(n_rows):
        r00, r01, r02 = rot[0, 0, c], rot[0, 1, c], rot[0, 2, c]
        r10, r11, r12 = rot[1, 0, c], rot[1, 1, c], rot[1, 2, c]
        r20, r21, r22 = rot[2, 0, c], rot[2, 1, c], rot[2, 2, c]
        t0, t1, t2 = trans[0, c], trans[1, c], trans[2, c]
        # Branch-free loops over contiguous columns (vectorised by LLVM); one reduction each.
        for m in range(n):
            px, py, pz = xs[m], ys[m], zs[m]
            dx = r00 * px + r01 * py + r02 * pz + t0 - us[m]
            dy = r10 * px + r11 * py + r12 * pz + t1 - vs[m]
            dz = r20 * px + r21 * py + r22 * pz + t2 - ws[m]
            row[m] = dx * dx + dy * dy + dz * dz
        n0 = n1 = n2 = n3 = n4 = n5 = n6 = close = 0
        for m in range(n):
            d2 = row[m]
            n0 += d2 <= c0
            n1 += d2 <= c1
            n2 += d2 <= c2
            n3 += d2 <= c3
            n4 += d2 <= c4
            n5 += d2 <= 144.0
            n6 += d2 <= 256.0
            close += d2 < base2
        bound = (n0 * b0 + (n1 - n0) * b1 + (n2 - n1) * b2 + (n3 - n2) * b3 + (n4 - n3) * b4 + (n5 - n4) * b5
                 + (n6 - n5) * b6 + (n - n6) * b7)
        tm = _tm_sum(row, d02) if bound * (1.0 + 1e-12) >= best_tm else -1.0
        if n0 > gdt_best[0]:
            gdt_best[0] = n0
        if n1 > gdt_best[1]:
            gdt_best[1] = n1
        if n2 > gdt_best[2]:
            gdt_best[2] = n2
        if n3 > gdt_best[3]:
            gdt_best[3] = n3
        if n4 > gdt_best[4]:
            gdt_best[4] = n4
        if tm > best_tm:
            best_tm = tm
        limit2 = base2
        if widen and close < 3:
            third = np.sqrt(np.sort(row)[2])
            cutoff = base + 0.5 * (np.floor((third - base) / 0.5) + 1.0)
            limit2 = cutoff * cutoff
        key = np.int64(0)
        differing = 0
        for m in range(n):
            inside = row[m] < limit2
            mask[c, m] = inside
            key += hash_weights[m] * inside
        if has_prev:
            for m in range(n):
                differing += mask[c, m] != prev[c, m]
        keys[c] = key
        changed[c] = differing > 0 or not has_prev
    return best_tm


@numba.njit(cache=True, nogil=True)
def _det3(m: np.ndarray, r0: int, r1: int, r2: int, k0: int, k1: int, k2: int) -> float:
    """Determinant of the 3x3 submatrix of a 4x4 ``m`` with rows r0..r2 and columns k0..k2."""
    return (m[r0, k0] * (m[r1, k1] * m[r2, k2] - m[r1, k2] * m[r2, k1])
            - m[r0, k1] * (m[r1, k0] * m[r2, k2] - m[r1, k2] * m[r2, k0])
            + m[r0, k2] * (m[r1, k0] * m[r2, k1] - m[r1, k1] * m[r2, k0]))


@numba.njit(cache=True, nogil=True)
def _adjugate4(m: np.ndarray, out: np.ndarray) -> None:
    """out = adj(m) for a symmetric 4x4 m (cofactor (i, j); adj is symmetric too)."""
    rows = np.empty(3, dtype=np.int64)
    cols = np.empty(3, dtype=np.int64)
    for i in range(4):
        for j in range(i, 4):
            a = 0
            for r in range(4):
                if r != i:
                    rows[a] = r
                    a += 1
            b = 0
            for k in range(4):
                if k != j:
                    cols[b] = k
                    b += 1
            value = _det3(m, rows[0], rows[1], rows[2], cols[0], cols[1], cols[2])
            if (i + j) % 2 == 1:
                value = -value
            out[i, j] = value
            out[j, i] = value


@numba.njit(cache=True, nogil=True)
def kabsch_fits(sums: np.ndarray, min_slope: float, rot: np.ndarray, trans: np.ndarray, ok: np.ndarray) -> None:
    """Weighted Kabsch fits from (16, C) sums [sum w x y^T (9), sum w x, sum w y, sum w] (metrics._fit_from_sums).

    The rotation is the Horn / Theobald quaternion closed form of metrics._rotation_closed_form, row by row:
    the largest root lambda_1 of K's characteristic polynomial by Newton's method from an upper bound, the
    eigenvector from adj(lambda_1 I - K) refined once. ``ok[c]`` False marks rows the caller must solve by
    SVD (zero or rank-deficient covariance, near-degenerate top eigenvalue, no convergence) - the same test
    as the NumPy code. Writes rot (3, 3, C), trans (3, C); weight 0 gives R = I, t = 0.
    """
    key = np.empty((4, 4))
    shifted = np.empty((4, 4))
    adj = np.empty((4, 4))
    h = np.empty(9)
    q = np.empty(4)
    for c in range(sums.shape[1]):
        weight = sums[15, c]
        safe = weight if weight > 0 else 1.0
        xm0, xm1, xm2 = sums[9, c] / safe, sums[10, c] / safe, sums[11, c] / safe
        ym0, ym1, ym2 = sums[12, c] / safe, sums[13, c] / safe, sums[14, c] / safe
        xm = (xm0, xm1, xm2)
        ym = (ym0, ym1, ym2)
        for a in range(3):
            for b in range(3):
                h[3 * a + b] = sums[3 * a + b, c] - weight * xm[a] * ym[b]
        hxx, hxy, hxz, hyx, hyy, hyz, hzx, hzy, hzz = h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8]
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
        norm2 = 0.0
        for k in range(9):
            norm2 += h[k] * h[k]
        cof0 = hyy * hzz - hyz * hzy
        cof1 = hyz * hzx - hyx * hzz
        cof2 = hyx * hzy - hyy * hzx
        cof_norm2 = (cof0 * cof0 + cof1 * cof1 + cof2 * cof2
                     + (hxz * hzy - hxy * hzz) ** 2 + (hxx * hzz - hxz * hzx) ** 2 + (hxy * hzx - hxx * hzy) ** 2
                     + (hxy * hyz - hxz * hyy) ** 2 + (hxz * hyx - hxx * hyz) ** 2 + (hxx * hyy - hxy * hyx) ** 2)
        c2 = -2.0 * norm2
        c1 = -8.0 * (hxx * cof0 + hxy * cof1 + hxz * cof2)
        _adjugate4(key, adj)
        c0 = key[0, 0] * adj[0, 0] + key[0, 1] * adj[0, 1] + key[0, 2] * adj[0, 2] + key[0, 3] * adj[0, 3]
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
        norm = 0.0
        for a in range(4):
            value = 0.0
            for b in range(4):
                value += adj[a, b] * adj[b, column]
            q[a] = value
            norm += value * value
        norm = np.sqrt(norm)
        finite = True
        for a in range(4):
            q[a] /= norm
            finite = finite and np.isfinite(q[a])
        ok[c] = norm2 > 0 and converged and slope > min_slope * lam * lam * lam and finite
        w, qx, qy, qz = q[0], q[1], q[2], q[3]
        rot[0, 0, c] = w * w + qx * qx - qy * qy - qz * qz
        rot[1, 1, c] = w * w - qx * qx + qy * qy - qz * qz
        rot[2, 2, c] = w * w - qx * qx - qy * qy + qz * qz
        rot[0, 1, c] = 2.0 * (qx * qy - w * qz)
        rot[1, 0, c] = 2.0 * (qx * qy + w * qz)
        rot[0, 2, c] = 2.0 * (qx * qz + w * qy)
        rot[2, 0, c] = 2.0 * (qx * qz - w * qy)
        rot[1, 2, c] = 2.0 * (qy * qz - w * qx)
        rot[2, 1, c] = 2.0 * (qy * qz + w * qx)
        if weight <= 0:
            for a in range(3):
                for b in range(3):
                    rot[a, b, c] = 1.0 if a == b else 0.0
            ok[c] = True
            trans[0, c] = trans[1, c] = trans[2, c] = 0.0
            continue
        for a in range(3):
            trans[a, c] = ym[a] - (rot[a, 0, c] * xm0 + rot[a, 1, c] * xm1 + rot[a, 2, c] * xm2)
