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


@numba.njit(cache=True, nogil=True)
def _pair_distance(coords: np.ndarray, a: int, b: int) -> float:
    # Same order as metrics._distances: ((dx^2 + dy^2) + dz^2), then sqrt.
    dx = coords[a, 0] - coords[b, 0]
    dy = coords[a, 1] - coords[b, 1]
    dz = coords[a, 2] - coords[b, 2]
    return np.sqrt(dx * dx + dy * dy + dz * dz)


@numba.njit(cache=True, nogil=True)
def _thresholds_passed(diff: float, thresholds: np.ndarray) -> int:
    """How many lDDT thresholds (0.5, 1, 2, 4 A) a distance difference is within. Branch-free: whether a
    pair passes is data-dependent, so a branch per threshold is mispredicted about half the time."""
    passed = 0
    for t in range(thresholds.shape[0]):
        passed += diff <= thresholds[t]
    return passed


@numba.njit(cache=True, nogil=True)
def lddt_pair_counts(model: np.ndarray, ref: np.ndarray, present: np.ndarray, starts: np.ndarray,
                     partners: np.ndarray, thresholds: np.ndarray, preserved: np.ndarray) -> None:
    """Add each pair's passed thresholds to ``preserved`` of both its atoms (metrics._lddt_counts).

    model, ref (M, 3) float64 atoms; present (M,) bool (modelled); the reference pairs as rows
    (metrics._pair_rows): atom a pairs with ``partners[starts[a]:starts[a + 1]]`` (int32). d_ref is recomputed
    from ``ref`` with the arithmetic that made the pair list (metrics._distances), so it is the same number:
    reading 4 bytes a pair instead of 24 (i, j, d_ref) keeps the ~10^5-10^6 pairs of a chain in cache.
    preserved (M,) float64 accumulator.
    """
    for a in range(starts.shape[0] - 1):
        if not present[a]:
            continue
        row = 0
        for k in range(starts[a], starts[a + 1]):
            b = partners[k]
            passed = _thresholds_passed(abs(_pair_distance(ref, a, b) - _pair_distance(model, a, b)), thresholds)
            passed *= present[b]
            row += passed
            preserved[b] += passed
        preserved[a] += row


@numba.njit(cache=True, nogil=True)
def lddt_symmetry_passes(coords: np.ndarray, present: np.ndarray, own: np.ndarray, swapped: np.ndarray,
                         other: np.ndarray, d_ref: np.ndarray, thresholds: np.ndarray, group: np.ndarray,
                         own_out: np.ndarray, swapped_out: np.ndarray) -> None:
    """The symmetry test of metrics._resolve_symmetry for both namings in one pass: each pair's passed
    thresholds with the symmetric atom read as ``own[k]`` go to ``own_out[group[k]]``, read as ``swapped[k]``
    to ``swapped_out[group[k]]``.

    coords (N, 3) float64 model atoms (flat atom37), present (N,) bool; own, swapped, other (K,) flat atom
    indices; d_ref (K,) reference distances; group (K,) residue of the symmetric atom.
    """
    for k in range(other.shape[0]):
        o = other[k]
        if not present[o]:
            continue
        a, b = own[k], swapped[k]
        if present[a]:
            own_out[group[k]] += _thresholds_passed(abs(d_ref[k] - _pair_distance(coords, a, o)), thresholds)
        if present[b]:
            swapped_out[group[k]] += _thresholds_passed(abs(d_ref[k] - _pair_distance(coords, b, o)), thresholds)


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
