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
def lddt_pair_counts(coords: np.ndarray, present: np.ndarray, i: np.ndarray, j: np.ndarray, d_ref: np.ndarray,
                     thresholds: np.ndarray, preserved: np.ndarray, total: np.ndarray) -> None:
    """Add each pair's passed thresholds to ``preserved[i]`` and ``preserved[j]``, and 1 to ``total`` of both.

    coords (M, 3) float64 model atoms; present (M,) bool; i, j, d_ref (K,) the reference pairs;
    preserved, total (M,) float64 accumulators (metrics._lddt_counts).
    """
    n_thresholds = thresholds.shape[0]
    for k in range(i.shape[0]):
        a, b = i[k], j[k]
        total[a] += 1.0
        total[b] += 1.0
        if not (present[a] and present[b]):
            continue
        diff = abs(d_ref[k] - _pair_distance(coords, a, b))
        passed = 0
        for t in range(n_thresholds):
            if diff <= thresholds[t]:
                passed += 1
        preserved[a] += passed
        preserved[b] += passed


@numba.njit(cache=True, nogil=True)
def lddt_group_passes(coords: np.ndarray, present: np.ndarray, left: np.ndarray, right: np.ndarray,
                      d_ref: np.ndarray, thresholds: np.ndarray, group: np.ndarray, out: np.ndarray) -> None:
    """Add each pair's passed thresholds to ``out[group[k]]`` (the symmetry test of metrics._resolve_symmetry).

    left, right (K,) flat atom indices into coords (M, 3); group (K,) residue of the left atom.
    """
    n_thresholds = thresholds.shape[0]
    for k in range(left.shape[0]):
        a, b = left[k], right[k]
        if not (present[a] and present[b]):
            continue
        diff = abs(d_ref[k] - _pair_distance(coords, a, b))
        passed = 0
        for t in range(n_thresholds):
            if diff <= thresholds[t]:
                passed += 1
        out[group[k]] += passed
