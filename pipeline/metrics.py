"""Structure metrics: Kabsch superposition, TM-score / GDT (TMscore search), RMSD and lDDT.

Every function takes NumPy arrays or torch tensors (``(..., N, 3)`` coordinates in Å, masks with
1 = present) and returns the same kind it was given. The module imports neither torch nor transformers (a
`foldtune score` process never loads them): NumPy does the work, and torch is used only when the caller
passes tensors (it is then already imported). One implementation of each piece of math:

- :func:`kabsch` - the project's only optimal superposition (weighted, proper rotation).
- :func:`tm_score` / :func:`tm_score_batch` - TM-score, GDT-TS, GDT-HA and RMSD with residue
  correspondence fixed by the caller, maximised over superpositions by the Zhang-Skolnick search of the
  ``TMscore`` program (version 2019/08/22, see docs/metrics.md for the exact rules reproduced).
- :func:`lddt` - all-atom or CA lDDT, OpenStructure conventions (symmetric side chains resolved).
- :func:`lddt_ca` - batched CA-lDDT on torch tensors for training / validation.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from data import residue_constants as rc

if TYPE_CHECKING:  # annotations only: importing this module never loads torch
    import torch

CA_INDEX: int = rc.atom_order["CA"]
GDT_TS_CUTOFFS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
GDT_HA_CUTOFFS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
_GDT_CUTOFFS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)  # counts kept by the search, in this order
LDDT_THRESHOLDS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
LDDT_INCLUSION_RADIUS: float = 15.0

# Side chains whose atom names can be swapped without changing the chemistry (OST GetDefaultSymmetrySettings).
SYMMETRIC_ATOMS: dict[str, tuple[tuple[str, str], ...]] = {
    "ASP": (("OD1", "OD2"),),
    "GLU": (("OE1", "OE2"),),
    "LEU": (("CD1", "CD2"),),
    "VAL": (("CG1", "CG2"),),
    "ARG": (("NH1", "NH2"),),
    "PHE": (("CD1", "CD2"), ("CE1", "CE2")),
    "TYR": (("CD1", "CD2"), ("CE1", "CE2")),
}


def _swap_table() -> np.ndarray:
    """(21, 37) int: for each AF2 restype, the atom37 index each atom is renamed to under the symmetry."""
    table = np.tile(np.arange(rc.atom_type_num), (rc.restype_num + 1, 1))
    for resname, pairs in SYMMETRIC_ATOMS.items():
        restype = rc.restype_order[rc.restype_3to1[resname]]
        for a, b in pairs:
            ia, ib = rc.atom_order[a], rc.atom_order[b]
            table[restype, ia], table[restype, ib] = ib, ia
    return table


_SWAP = _swap_table()


# ------------------------------------------------------------------------------------------------ helpers
def _is_tensor(x) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch (no tensor exists unless torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _xp(*arrays):
    """The array module for the inputs: torch if any of them is a tensor, else NumPy."""
    return sys.modules["torch"] if any(_is_tensor(a) for a in arrays) else np


def _as(xp, x, dtype=None, device=None):
    """``x`` as an array of module ``xp`` (NumPy or torch), optionally cast to ``dtype`` / moved to ``device``."""
    if xp is np:
        return np.asarray(x.detach().cpu().numpy() if _is_tensor(x) else x, dtype=dtype)
    t = x if isinstance(x, xp.Tensor) else xp.as_tensor(np.asarray(x))
    return t.to(device=device if device is not None else t.device, dtype=dtype if dtype is not None else t.dtype)


def _like(result: np.ndarray, template):
    """Return the NumPy ``result`` as the kind (NumPy / torch, and torch device) of ``template``."""
    if _is_tensor(template):
        return sys.modules["torch"].from_numpy(np.ascontiguousarray(result)).to(template.device)
    return result


_blas_controller = None


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """NumPy's BLAS on one thread for the block: the search's GEMMs are small, and OpenBLAS spreading them over
    every core costs ~10x on a loaded machine (and competes with the caller's own threads)."""
    global _blas_controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional speed-up: without it NumPy keeps its default threads
        yield
        return
    if _blas_controller is None:
        _blas_controller = ThreadpoolController()
    with _blas_controller.limit(limits=1, user_api="blas"):
        yield


# Compiled kernels (pipeline/kernels.py, numba): off until a batch entry point asks for them
# (use_compiled_kernels), because numba's import + loading the cached machine code (~0.5-0.9 s) is more than
# scoring one pair, or a few dozen small ones, takes. FOLDTUNE_COMPILED=0 keeps them off, =1 turns them on from the start.
_compiled_wanted: bool = os.environ.get("FOLDTUNE_COMPILED", "") == "1"
_compiled_module = None


def use_compiled_kernels(enabled: bool = True) -> bool:
    """Use the numba kernels from now on in this process (same results, faster on many pairs).

    Batch scoring (``scoring.score_table`` / ``score_predictions``) calls this once the rows left are worth
    the load time. Returns whether the kernels are active (False when numba is not installed or
    FOLDTUNE_COMPILED=0).
    """
    global _compiled_wanted
    _compiled_wanted = bool(enabled) and os.environ.get("FOLDTUNE_COMPILED", "") != "0"
    return _kernels() is not None


def _kernels():
    """The kernels module when wanted and importable, else None (the NumPy code runs)."""
    global _compiled_module
    if not _compiled_wanted:
        return None
    if _compiled_module is None:
        try:
            from pipeline import kernels
        except ImportError:  # numba missing: NumPy only
            _compiled_module = False
        else:
            _compiled_module = kernels
    return _compiled_module or None


def _mm(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a @ b (float64); ``out``: a C-contiguous array to write into (reusing one buffer avoids page faults).

    Callers that run many of these wrap them in :func:`_single_threaded_blas`.
    """
    return np.matmul(a, b, out=out)


# ------------------------------------------------------------------------------------------------ Kabsch
# Rows with p'(lambda_1) below this * lambda_1^3 go to the SVD: their relative eigen-gap may be below ~6e-4,
# where the closed form's eigenvector loses accuracy (see _rotation_closed_form).
_CLOSED_FORM_MIN_SLOPE: float = 1e-2


def _rotation_svd(cov):
    """(..., 3, 3) covariance H -> proper rotation R maximising tr(R H), by SVD (NumPy, or torch: differentiable)."""
    xp = _xp(cov)
    u, _, vh = xp.linalg.svd(cov)
    v, ut = vh.swapaxes(-1, -2), u.swapaxes(-1, -2)
    sign = xp.sign(xp.linalg.det(v @ ut))
    sign = xp.where(sign == 0, xp.ones_like(sign), sign)
    diag = xp.ones_like(cov[..., 0])  # (..., 3)
    diag[..., 2] = sign
    return v @ (diag[..., None] * ut)


def _linear_map(rows: dict[tuple[int, int], dict[tuple[int, int], float]], n_out: int, n_in: int,
                symmetric: bool = False) -> np.ndarray:
    """Matrix of a linear map written entry by entry: out[i, j] = sum coef * in[a, b], flat row-major indices.

    out is (n_out, n_out) and in (n_in, n_in); ``symmetric`` also fills out[j, i]. Returns (n_out^2, n_in^2).
    """
    matrix = np.zeros((n_out * n_out, n_in * n_in))
    for (i, j), terms in rows.items():
        for (a, b), coef in terms.items():
            matrix[n_out * i + j, n_in * a + b] += coef
            if symmetric and i != j:
                matrix[n_out * j + i, n_in * a + b] += coef
    return matrix


def _key_map() -> np.ndarray:
    """(16, 9): Horn's key matrix K(H), with tr(R(q) H) = q^T K q for a unit quaternion q, H = sum x y^T."""
    x, y, z = 0, 1, 2
    return _linear_map({
        (0, 0): {(x, x): 1, (y, y): 1, (z, z): 1}, (1, 1): {(x, x): 1, (y, y): -1, (z, z): -1},
        (2, 2): {(x, x): -1, (y, y): 1, (z, z): -1}, (3, 3): {(x, x): -1, (y, y): -1, (z, z): 1},
        (0, 1): {(y, z): 1, (z, y): -1}, (0, 2): {(z, x): 1, (x, z): -1}, (0, 3): {(x, y): 1, (y, x): -1},
        (1, 2): {(x, y): 1, (y, x): 1}, (1, 3): {(z, x): 1, (x, z): 1}, (2, 3): {(y, z): 1, (z, y): 1},
    }, 4, 3, symmetric=True)


def _quaternion_map() -> np.ndarray:
    """(9, 16): rotation matrix of a unit quaternion (w, x, y, z) from the products q_a q_b (2 xy = xy + yx)."""
    w, x, y, z = 0, 1, 2, 3
    return _linear_map({
        (0, 0): {(w, w): 1, (x, x): 1, (y, y): -1, (z, z): -1},
        (1, 1): {(w, w): 1, (x, x): -1, (y, y): 1, (z, z): -1},
        (2, 2): {(w, w): 1, (x, x): -1, (y, y): -1, (z, z): 1},
        (0, 1): {(x, y): 1, (y, x): 1, (w, z): -1, (z, w): -1}, (1, 0): {(x, y): 1, (y, x): 1, (w, z): 1, (z, w): 1},
        (0, 2): {(x, z): 1, (z, x): 1, (w, y): 1, (y, w): 1}, (2, 0): {(x, z): 1, (z, x): 1, (w, y): -1, (y, w): -1},
        (1, 2): {(y, z): 1, (z, y): 1, (w, x): -1, (x, w): -1}, (2, 1): {(y, z): 1, (z, y): 1, (w, x): 1, (x, w): 1},
    }, 3, 4)


_KEY_MAP = _key_map()
_QUATERNION_MAP = _quaternion_map()


def _cofactor_tables(entries: Sequence[tuple[int, int]]) -> tuple[np.ndarray, ...]:
    """Index tables giving the cofactors ``entries`` of 4x4 matrices from their 2x2 minors.

    Cofactor (i, j) = (-1)^(i+j) det(3x3 left by deleting row i, column j), expanded along that 3x3's first
    row r0: sum_k (-1)^k a[r0, c_k] minor((r1, r2), the other two columns). A 2x2 minor is
    a[r1, c1] a[r2, c2] - a[r1, c2] a[r2, c1]. Indices refer to the flat (16,) layout. Returns
    (minor_index (4, M): the four entries of each needed minor, term_entry, term_minor, term_sign (E, 3)).
    """
    minors: dict[tuple[int, int, int, int], int] = {}
    term_entry, term_minor, term_sign = np.zeros((len(entries), 3), int), np.zeros((len(entries), 3), int), []
    for e, (i, j) in enumerate(entries):
        rows = [r for r in range(4) if r != i]
        cols = [c for c in range(4) if c != j]
        signs = []
        for k, col in enumerate(cols):
            c1, c2 = (c for c in cols if c != col)
            key = (rows[1], rows[2], c1, c2)
            term_entry[e, k] = 4 * rows[0] + col
            term_minor[e, k] = minors.setdefault(key, len(minors))
            signs.append((-1.0) ** (i + j + k))
        term_sign.append(signs)
    minor_index = np.array([[4 * r1 + c1, 4 * r2 + c2, 4 * r1 + c2, 4 * r2 + c1] for r1, r2, c1, c2 in minors]).T
    return minor_index, term_entry, term_minor, np.array(term_sign)


_UPPER = [(i, j) for i in range(4) for j in range(i, 4)]
_COFACTORS_ROW0 = _cofactor_tables([(0, j) for j in range(4)])  # det K = sum_j K[0, j] cofactor(0, j)
_COFACTORS_UPPER = _cofactor_tables(_UPPER)  # adjugate of a symmetric matrix (symmetric too)
_UPPER_OF = np.array([_UPPER.index((min(i, j), max(i, j))) for i in range(4) for j in range(4)])  # (16,)


def _cofactors(a: np.ndarray, tables: tuple[np.ndarray, ...]) -> np.ndarray:
    """Cofactors (E, C) of (16, C) component-major 4x4 matrices, for the entries the tables were built for."""
    minor_index, term_entry, term_minor, term_sign = tables
    minors = a[minor_index[0]] * a[minor_index[1]] - a[minor_index[2]] * a[minor_index[3]]
    return (term_sign[..., None] * a[term_entry] * minors[term_minor]).sum(1)


def _cofactor3_table() -> np.ndarray:
    """(4, 9) indices with cofactor k of a flat (9,) 3x3 matrix h = h[A] h[B] - h[C] h[D] (k = 3 row + col)."""
    table = []
    for r in range(3):
        for c in range(3):
            (r0, r1), (c0, c1) = [x for x in range(3) if x != r], [x for x in range(3) if x != c]
            plus, minus = (3 * r0 + c0, 3 * r1 + c1), (3 * r0 + c1, 3 * r1 + c0)
            table.append(plus + minus if (r + c) % 2 == 0 else minus + plus)
    return np.array(table).T


_COFACTORS3 = _cofactor3_table()


def _rotation_closed_form(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horn / Theobald quaternion solution of ``max_R tr(R H)`` for a batch of 3x3 covariances.

    Args:
        h: (9, C) float64 covariances H = sum_i w_i x_i y_i^T (centred), component-major: row 3 a + b is
            H[a, b] of every problem (so each elementwise step below is one contiguous NumPy operation).
    Returns:
        rot (9, C) proper rotations (same layout), ok (C,) bool: False where the result is not trustworthy
        (zero or rank-deficient H, near-degenerate top eigenvalue); the caller solves those by SVD.

    For a unit quaternion q, tr(R(q) H) = q^T K q with Horn's symmetric traceless 4x4 key matrix K, so the
    best rotation is the eigenvector of K's largest eigenvalue lambda_1 = s1 + s2 + sign(det H) s3 (s: singular
    values of H). lambda_1 is the largest root of the characteristic polynomial
    p(l) = l^4 - 2 |H|_F^2 l^2 - 8 det(H) l + det(K), found by Newton's method from an upper bound (from
    above, Newton decreases monotonically onto the root: all roots are real).
    The eigenvector is a column of adj(lambda_1 I - K) = p'(lambda_1) q q^T (rank one; the column with the
    largest diagonal entry, i.e. the largest |q_i|), refined by one more product with that adjugate (one
    step of inverse iteration: the error from the residual in lambda_1 is squared).
    The gap to the next eigenvalue is lambda_1 - lambda_2 = 2 (s2 + sign(det H) s3) >= p'(lambda_1) /
    (16 lambda_1^2). Rows with p'(lambda_1) < _CLOSED_FORM_MIN_SLOPE lambda_1^3 (e.g. collinear points,
    where the rotation about the line is arbitrary) or whose Newton iteration has not converged are
    flagged; the others agree with the SVD solution to ~1e-13.
    """
    n_rows = h.shape[1]
    key = _mm(_KEY_MAP, h)  # (16, C)
    cof = h[_COFACTORS3[0]] * h[_COFACTORS3[1]] - h[_COFACTORS3[2]] * h[_COFACTORS3[3]]  # (9, C) of H
    norm2 = (h * h).sum(0)
    c2, c1 = -2.0 * norm2, -8.0 * (h[0:3] * cof[0:3]).sum(0)  # c1 = -8 det H
    c0 = (key[0:4] * _cofactors(key, _COFACTORS_ROW0)).sum(0)  # det K along its first row
    # Start above lambda_1 <= s1 + s2 + s3 = sqrt(|H|^2 + 2 (s1 s2 + s1 s3 + s2 s3)), and
    # s1 s2 + s1 s3 + s2 s3 <= sqrt(3 (s1^2 s2^2 + s1^2 s3^2 + s2^2 s3^2)) = sqrt(3 |cof H|^2); the margin keeps
    # the start strictly above a double root (rank-1 H meets the bound exactly, where p = p' = 0).
    lam = np.sqrt(norm2 + 2.0 * np.sqrt(3.0 * (cof * cof).sum(0))) * (1.0 + 1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(100):
            slope = (4.0 * lam * lam + 2.0 * c2) * lam + c1
            step = (((lam * lam + c2) * lam + c1) * lam + c0) / slope
            lam = lam - step
            # Stop when every row has converged (quadratic: after |step| < 1e-9 lam one more step reaches
            # rounding level) or will be flagged anyway (p' small: a near-double root, converging linearly).
            if not ((np.abs(step) > 1e-9 * lam) & (slope > _CLOSED_FORM_MIN_SLOPE * lam * lam * lam)).any():
                break
        slope = (4.0 * lam * lam + 2.0 * c2) * lam + c1
        step = (((lam * lam + c2) * lam + c1) * lam + c0) / slope
        lam = lam - step
        converged = np.abs(step) <= 1e-12 * lam
        shifted = -key  # lambda_1 I - K: its adjugate is +p'(lambda_1) q q^T (that of K - lambda_1 I is -p' q q^T)
        shifted[[0, 5, 10, 15]] += lam
        adj = _cofactors(shifted, _COFACTORS_UPPER)[_UPPER_OF].reshape(4, 4, n_rows)
        column = np.argmax(adj[[0, 1, 2, 3], [0, 1, 2, 3]], axis=0)  # largest diagonal: best-scaled column
        q = adj[:, column, np.arange(n_rows)]  # (4, C)
        q = (adj * q[None]).sum(1)
        q = q / np.sqrt((q * q).sum(0))
    ok = (norm2 > 0) & converged & (slope > _CLOSED_FORM_MIN_SLOPE * lam * lam * lam) & np.isfinite(q).all(0)
    with np.errstate(invalid="ignore"):  # NaN rows (flagged in ok) are replaced by the caller
        return _mm(_QUATERNION_MAP, (q[:, None] * q[None]).reshape(16, n_rows)), ok


def _rotation_components(h: np.ndarray) -> np.ndarray:
    """(9, C) component-major covariances -> (9, C) best proper rotations (closed form, SVD where flagged)."""
    rot, ok = _rotation_closed_form(h)
    if not ok.all():
        hard = np.ascontiguousarray(h[:, ~ok].T).reshape(-1, 3, 3)
        rot[:, ~ok] = _rotation_svd(hard).reshape(-1, 9).T
    return rot


def best_rotation(cov):
    """Proper rotation R maximising tr(R H) for covariances H (..., 3, 3): the core of every Kabsch fit.

    ``H = sum_i w_i (p_i - p_mean)(q_i - q_mean)^T`` makes R the least-squares rotation of P onto Q. Torch
    tensors that require grad use the SVD (differentiable); everything else uses the quaternion closed form
    (:func:`_rotation_closed_form`; ~7x faster than LAPACK's batched SVD on the TM-score search's ~1,300 fits),
    with the SVD for the rows it flags as ill-conditioned (there the optimum is not unique, or nearly so, and
    the SVD's choice is kept). Same kind / dtype / device as ``cov``.
    """
    if _is_tensor(cov):
        torch = sys.modules["torch"]
        if cov.requires_grad and torch.is_grad_enabled():
            return _rotation_svd(cov)
        rot = best_rotation(cov.detach().to("cpu", torch.float64).numpy())
        return torch.from_numpy(rot).to(cov.device, cov.dtype)
    shape = np.shape(cov)
    h = np.ascontiguousarray(np.asarray(cov, dtype=np.float64).reshape(-1, 9).T)
    return np.ascontiguousarray(_rotation_components(h).T).reshape(shape)


def kabsch(P, Q, mask=None):
    """Optimal proper rotation and translation of ``P`` onto ``Q`` (least squares, optionally weighted).

    Args:
        P, Q: (..., N, 3) coordinates; row i of P is matched to row i of Q.
        mask: (..., N) weights or 0/1 mask (None = all ones). Rows with weight 0 are ignored.
    Returns:
        R (..., 3, 3), t (..., 3) such that ``P @ R^T + t`` is the superposed P (det R = +1).
        Where the total weight is 0, R = I and t = 0 (like TMscore's u3b).
    NumPy in -> NumPy float64 out; torch in -> torch out in the input dtype (differentiable).
    """
    xp = _xp(P, Q, mask)
    if xp is np:
        dtype, device = np.float64, None
    else:
        dtype = P.dtype if _is_tensor(P) and P.is_floating_point() else xp.float64
        device = P.device if _is_tensor(P) else None
    p = _as(xp, P, dtype, device)
    q = _as(xp, Q, dtype, p.device if xp is not np else None)
    w = xp.ones_like(p[..., 0]) if mask is None else _as(xp, mask, dtype, p.device if xp is not np else None)
    total = w.sum(-1)[..., None]  # (..., 1)
    safe = xp.where(total > 0, total, xp.ones_like(total))
    p_mean = (w[..., None] * p).sum(-2) / safe
    q_mean = (w[..., None] * q).sum(-2) / safe
    pc, qc = p - p_mean[..., None, :], q - q_mean[..., None, :]
    h = (w[..., None] * pc).swapaxes(-1, -2) @ qc  # (..., 3, 3) covariance, sum_i w_i p_i q_i^T
    rot = best_rotation(h)
    empty = (total[..., 0] <= 0)[..., None, None]
    identity = xp.zeros_like(rot)
    identity[..., [0, 1, 2], [0, 1, 2]] = 1
    rot = xp.where(empty, identity, rot)
    trans = q_mean - (p_mean[..., None, :] @ rot.swapaxes(-1, -2))[..., 0, :]
    trans = xp.where(empty[..., 0], xp.zeros_like(trans), trans)
    if xp is not np and not _is_tensor(P):  # torch only because Q / mask were tensors: P's kind wins
        return rot.detach().cpu().numpy(), trans.detach().cpu().numpy()
    return rot, trans


def superpose(P, R, t):
    """Apply ``(R, t)`` from :func:`kabsch` to ``P`` (..., N, 3)."""
    if _is_tensor(P):
        return P @ R.transpose(-1, -2) + t[..., None, :]
    return np.asarray(P) @ np.swapaxes(R, -1, -2) + np.asarray(t)[..., None, :]


def rmsd(P, Q, mask=None, superimpose: bool = True):
    """RMSD (Å) between matched rows of P and Q (..., N, 3) over ``mask``, after Kabsch if ``superimpose``."""
    xp = _xp(P, Q, mask)
    float64 = np.float64 if xp is np else xp.float64
    p = _as(xp, P, float64)
    q = _as(xp, Q, float64, None if xp is np else p.device)
    w = xp.ones_like(p[..., 0]) if mask is None else _as(xp, mask, float64, None if xp is np else p.device)
    if superimpose:
        rot, trans = kabsch(p, q, w)
        p = superpose(p, rot, trans)
    sq = ((p - q) ** 2).sum(-1)
    weight = w.sum(-1)
    value = xp.sqrt((w * sq).sum(-1) / xp.where(weight > 1e-12, weight, xp.full_like(weight, 1e-12)))
    if not value.ndim:
        return float(value)
    if xp is not np and not _is_tensor(P):  # torch only because Q / mask were tensors: P's kind wins
        return value.detach().cpu().numpy()
    return value


# -------------------------------------------------------------------------------------------- TM-score
def tm_d0(l_ref: float) -> float:
    """TM-score distance scale d0(L) = 1.24 (L - 15)^(1/3) - 1.8 Å (0.5 for L <= 21, floor 0.5)."""
    d0 = 1.24 * (l_ref - 15.0) ** (1.0 / 3.0) - 1.8 if l_ref > 15 else 0.5
    return max(d0, 0.5)


def _seed_lengths(n_ali: int) -> list[int]:
    """Fragment lengths L_ali, L_ali/2, ... (integer halving), at least 4 (or n_ali), at most 6 lengths."""
    minimum = min(4, n_ali)
    lengths = []
    for k in range(5):
        length = n_ali // 2**k
        if length <= minimum:
            lengths.append(minimum)
            return lengths
        lengths.append(length)
    lengths.append(minimum)
    return lengths


def _pair_features(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n, 16) per-pair features [vec(x y^T) (9), x (3), y (3), 1].

    ``mask @ F`` gives every sum a weighted Kabsch fit needs, and ``A @ [F, |x|^2 + |y|^2]^T`` with the
    coefficients of :func:`_distance_coefficients` gives squared distances: both steps of the search are GEMMs.
    """
    outer = (x[:, :, None] * y[:, None, :]).reshape(-1, 9)
    return np.concatenate([outer, x, y, np.ones_like(x[:, :1])], axis=1)


def _fit_from_sums(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kabsch fits from (16, C) weighted sums [sum w x y^T (9), sum w x, sum w y, sum w] (see kabsch).

    Component-major like :func:`_rotation_closed_form`: returns R (3, 3, C) and t (3, C); where the weight
    is 0, R = I and t = 0.
    """
    n_rows = sums.shape[1]
    weight = sums[15]
    safe = np.where(weight > 0, weight, 1.0)
    x_mean, y_mean = sums[9:12] / safe, sums[12:15] / safe
    cov = sums[:9] - (weight * x_mean[:, None] * y_mean[None, :]).reshape(9, n_rows)
    rot = _rotation_components(cov).reshape(3, 3, n_rows)
    empty = weight <= 0
    if empty.any():
        rot[:, :, empty] = np.eye(3)[:, :, None]
    trans = y_mean - (rot * x_mean[None]).sum(1)
    trans[:, empty] = 0.0
    return rot, trans


def _distance_coefficients(rot: np.ndarray, trans: np.ndarray) -> np.ndarray:
    """(17, C) A with |R x_n + t - y_n|^2 = (A^T G)[c, n] for G = [F^T; |x_n|^2 + |y_n|^2] (F: _pair_features).

    rot (3, 3, C), trans (3, C) component-major (see :func:`_fit_from_sums`).
    """
    return np.concatenate(
        [
            -2.0 * rot.transpose(1, 0, 2).reshape(9, -1),  # -2 y^T R x = -2 sum_ij R_ij y_i x_j
            2.0 * (rot * trans[:, None]).sum(0),  # 2 (R^T t) . x
            -2.0 * trans,
            (trans * trans).sum(0, keepdims=True),
            np.ones_like(trans[:1]),
        ]
    )


def _row_counts(mask: np.ndarray) -> np.ndarray:
    """Number of True per row of a (C, n) bool array (summing bytes beats np.count_nonzero(axis=1) ~3x)."""
    return mask.view(np.uint8).sum(1, dtype=np.uint16 if mask.shape[1] < 2**16 else np.int64)


def _tm_search(x: np.ndarray, y: np.ndarray, l_ref: float, max_iter: int = 20) -> dict:
    """Zhang-Skolnick search of TMscore for one pair, every candidate superposition in one batch.

    x, y: (n, 3) float64 aligned CA pairs in order. Each seed (every window of every fragment length)
    is fitted, scored, and extended: pairs closer than d0_search - 1 (then d0_search + 1) Å define the
    next fit, widened by 0.5 Å until >= 3 pairs, for up to ``max_iter`` rounds or until the pair set is
    unchanged. Candidates that reach the same pair set at the same round are merged (their futures are
    identical). TM-score and every GDT count are maximised over all fits.
    Returns ``tm`` (float) and ``gdt`` (5,) best counts for 0.5/1/2/4/8 Å.

    Everything per candidate is component-major ((k, C) arrays). NumPy does the compares and reductions on
    the (C candidates, n pairs) distance matrix (~3x faster than torch's at these sizes); the two GEMMs per
    round (fits' sums, squared distances) run on one BLAS thread (the caller's :func:`_single_threaded_blas`).
    """
    n = x.shape[0]
    x = x - x.mean(0)  # centring keeps the expanded distance formula precise
    y = y - y.mean(0)
    d0 = tm_d0(l_ref)
    d0_search = min(max(d0, 4.5), 8.0)
    kernels = _kernels()
    if kernels is not None:  # the same search in one compiled call
        return _tm_search_compiled(kernels, x, y, l_ref, d0, d0_search, max_iter)
    feats = _pair_features(x, y)  # (n, 16)
    feats_t = np.ascontiguousarray(feats.T)
    # (17, n): the features plus |x|^2 + |y|^2, so that one GEMM gives squared distances.
    dist_feats = np.concatenate([feats_t, ((x * x).sum(-1) + (y * y).sum(-1))[None]])
    cut2 = np.square(_GDT_CUTOFFS)

    # Seeds: every window of every length; their sums come from prefix sums in O(1) each.
    prefix = np.concatenate([np.zeros_like(feats_t[:, :1]), feats_t.cumsum(1)], axis=1)  # (16, n + 1)
    seed_lengths = _seed_lengths(n)
    start = np.concatenate([np.arange(n - length + 1) for length in seed_lengths])
    length = np.concatenate([np.full(n - length + 1, length) for length in seed_lengths])
    sums = prefix[:, start + length] - prefix[:, start]  # (16, C)
    packed = None  # pair sets of the candidates, 8 per byte (none for the seeds: no convergence test at step 0)

    best_tm = -1.0
    best_gdt = np.full(len(_GDT_CUTOFFS), -1, dtype=np.int64)
    # Pair sets are compared by a 64-bit hash of their bytes (random weights, wrapping sums): two different
    # sets collide with probability <= 2^-56.
    hash_weights = np.random.default_rng(0).integers(-(2**62), 2**62, size=(n + 7) // 8, dtype=np.int64)
    d02 = d0 * d0
    seen = np.zeros(0, dtype=np.int64)
    # Work buffers for the largest round (the seeds); later rounds use their first rows.
    dist_buffer = np.empty((sums.shape[1], n))
    below_buffer = np.empty((sums.shape[1], n), dtype=bool)

    for step in range(max_iter + 1):
        rot, trans = _fit_from_sums(sums)
        dist2 = _mm(_distance_coefficients(rot, trans).T, dist_feats, out=dist_buffer[: sums.shape[1]])  # (C, n)
        below = below_buffer[: sums.shape[1]]
        for k, c2 in enumerate(cut2):
            best_gdt[k] = max(best_gdt[k], int(_row_counts(np.less_equal(dist2, c2, out=below)).max()))
        # Pairs closer than d0_search -/+ 1 define the next fit; widen by 0.5 A until >= 3 pairs.
        base = d0_search + (1.0 if step > 0 else -1.0)
        new_mask = np.less(dist2, base * base)
        if n > 3 and step < max_iter:
            few = _row_counts(new_mask) < 3
            if few.any():
                close = dist2[few]
                third = np.sqrt(np.partition(close, 2, axis=1)[:, 2])
                cutoff = base + 0.5 * (np.floor((third - base) / 0.5) + 1.0)
                new_mask[few] = close < (cutoff * cutoff)[:, None]
        # TM terms 1 / (1 + d^2 / d0^2) = d0^2 / (d0^2 + d^2), in place (dist2 is not used below). The clamp
        # only matters here: rounding can leave d^2 slightly below 0 (a term above 1), which no cutoff above sees.
        terms = np.maximum(dist2, 0.0, out=dist2)
        terms += d02
        np.reciprocal(terms, out=terms)
        best_tm = max(best_tm, float(terms.sum(-1).max()) * d02 / l_ref)
        if step == max_iter:
            break
        new_packed = np.packbits(new_mask, axis=1)
        if packed is not None:  # candidates whose pair set did not change have converged
            moving = (new_packed != packed).any(1)
            new_mask, new_packed = new_mask[moving], new_packed[moving]
        if new_mask.shape[0] == 0:
            break
        follow, seen = _new_pair_sets(new_packed.astype(np.int64) @ hash_weights, seen)
        if follow.size == 0:
            break
        packed = new_packed[follow]
        # sums = (mask @ feats)^T = feats^T @ mask^T: that GEMM shape is ~2x faster than mask @ feats.
        sums = _mm(feats_t, new_mask[follow].astype(np.float64).T)
    return {"tm": best_tm, "gdt": best_gdt}


def _new_pair_sets(keys: np.ndarray, seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates to follow: the first of each distinct pair set (by 64-bit key) not followed before.

    A pair set already reached (at this round or an earlier one, i.e. with at least as many rounds left)
    has a known future: fits are a function of the pair set alone. Returns (indices into keys, the sorted
    keys of every set followed so far, these included).
    """
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.ones(ordered.size, dtype=bool)  # first candidate of each distinct set
    first[1:] = ordered[1:] != ordered[:-1]
    unique, follow = ordered[first], order[first]
    at = np.searchsorted(seen, unique)  # seen: sorted keys of every set followed so far
    fresh = seen[np.minimum(at, seen.size - 1)] != unique if seen.size else np.ones(unique.size, dtype=bool)
    unique, follow = unique[fresh], follow[fresh]
    return follow, np.sort(np.concatenate([seen, unique]))


def _tm_search_compiled(kernels, x: np.ndarray, y: np.ndarray, l_ref: float, d0: float, d0_search: float,
                        max_iter: int) -> dict:
    """:func:`_tm_search` in one compiled call (``kernels.tm_search``): same seeds, rules and bookkeeping.

    Distances are computed directly as |R x + t - y|^2 (the NumPy path expands them into one GEMM) and a
    followed pair set's sums are updated by the pairs that entered and left, so results agree to rounding
    (tests/test_metrics_compiled.py). Also returns the RMSD of the all-pairs fit (seed 0) and ``svd_fits``, how
    many fits the closed form flagged and the SVD solved.
    """
    best_gdt = np.full(len(_GDT_CUTOFFS), -1, dtype=np.int64)
    hash_weights = np.random.default_rng(0).integers(-(2**62), 2**62, size=x.shape[0], dtype=np.int64)
    best_sum, rmsd_all, n_svd = kernels.tm_search(
        np.ascontiguousarray(x), np.ascontiguousarray(y), d0, d0_search,
        np.asarray(_seed_lengths(x.shape[0]), dtype=np.int64), max_iter, np.square(np.asarray(_GDT_CUTOFFS)),
        hash_weights, _CLOSED_FORM_MIN_SLOPE, best_gdt)
    return {"tm": best_sum * d0 * d0 / l_ref, "gdt": best_gdt, "rmsd": rmsd_all, "svd_fits": n_svd}


def tm_score_batch(pred_ca, ref_ca, mask=None, l_ref=None, max_iter: int = 20) -> list[dict]:
    """TM-score, GDT-TS, GDT-HA and RMSD for a batch of pairs with fixed residue correspondence.

    Args:
        pred_ca, ref_ca: (B, N, 3) CA coordinates; row i of pred is matched to row i of ref.
        mask: (B, N) 1 where the pair i is aligned (present in both); None = all rows.
        l_ref: (B,) reference lengths used for normalisation and d0 (default: N for every pair).
        max_iter: extension rounds per seed (TMscore: 20).
    Returns:
        one dict per pair with ``tm_score, gdt_ts, gdt_ha, rmsd, n_aligned, l_ref`` (floats / ints).
    Rows are used in the given order: seed fragments slide along the aligned rows as TMscore slides
    along its residue pairs.
    """
    x = _as(np, pred_ca, np.float64)
    y = _as(np, ref_ca, np.float64)
    n_batch, width = x.shape[:2]
    valid = np.ones((n_batch, width), dtype=bool) if mask is None else _as(np, mask) != 0
    n_ali = valid.sum(-1)
    if (n_ali == 0).any():
        raise ValueError("tm_score: no aligned residue pairs (mask is empty)")
    l_ref_all = np.full(n_batch, float(width)) if l_ref is None else _as(np, l_ref, np.float64).reshape(n_batch)
    results = []
    # The NumPy search is many small GEMMs: extra BLAS threads only add sync overhead. The compiled search
    # uses no BLAS, and switching threadpools costs ~0.3 ms a call.
    with _single_threaded_blas() if _kernels() is None else contextlib.nullcontext():
        for b in range(n_batch):
            keep = valid[b]
            xb, yb = x[b][keep], y[b][keep]  # aligned pairs, in row order
            found = _tm_search(xb, yb, float(l_ref_all[b]), max_iter=max_iter)
            frac = found["gdt"].astype(np.float64) / l_ref_all[b]  # 0.5, 1, 2, 4, 8 Å
            results.append(
                {
                    "tm_score": float(found["tm"]),
                    "gdt_ts": float(frac[1:5].mean()),
                    "gdt_ha": float(frac[0:4].mean()),
                    "rmsd": float(found["rmsd"]) if "rmsd" in found else float(rmsd(xb, yb)),
                    "n_aligned": int(n_ali[b]),
                    "l_ref": int(l_ref_all[b]),
                }
            )
    return results


def tm_score(pred_ca, ref_ca, mask=None, l_ref: int | None = None, max_iter: int = 20) -> dict:
    """TM-score / GDT-TS / GDT-HA / RMSD of one model against its reference (see :func:`tm_score_batch`).

    pred_ca, ref_ca: (N, 3) matched CA rows; mask: (N,) aligned pairs; l_ref: reference length
    (default N - pass the full reference length when the rows cover only the aligned residues).
    """
    x = _as(np, pred_ca, np.float64)[None]
    y = _as(np, ref_ca, np.float64)[None]
    m = None if mask is None else (_as(np, mask) != 0)[None]
    lengths = None if l_ref is None else [l_ref]
    return tm_score_batch(x, y, m, lengths, max_iter=max_iter)[0]


# ------------------------------------------------------------------------------------------------- lDDT
# The lDDT core is NumPy on the CPU: on its pair lists (~10^5-10^6 entries) NumPy's gathers, compares and
# nonzero run 3-10x faster than torch's CPU kernels. lddt_ca (torch API) uses the same core.
def _contact_pairs(
    ref: np.ndarray, ref_mask: np.ndarray, group: np.ndarray, cutoff: float, chunk: int = 512,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs lDDT scores: reference atoms i < j of different groups, both present, d_ref <= cutoff.

    ref: (B, M, 3) float64; ref_mask: (B, M) bool; group: (B, M) residue id. Returns (i, j, d_ref), each
    (K,), with i and j flat indices into the B * M atoms (b * M + atom). Only ~15% of all-atom pairs lie
    within 15 Å, so everything after this works on the pair list. A float32 GEMM over row chunks preselects
    candidates with a margin far above its rounding error; ``d_ref`` is then computed directly (difference,
    norm) in float64 and the cutoff applied to it, exactly as a direct all-pairs computation would. The
    compiled kernel is that direct computation, skipping blocks of atoms out of reach (same pairs, same
    order; ~1.4x faster than the GEMM route, whose search per reference cost as much as scoring ten models).
    """
    n_batch, n_atoms = ref.shape[:2]
    kernels = _kernels()
    if kernels is not None:
        return kernels.contact_pairs(np.ascontiguousarray(ref.reshape(-1, 3), dtype=np.float64),
                                     np.ascontiguousarray(ref_mask.reshape(-1)), np.ascontiguousarray(group.reshape(-1)),
                                     n_batch, n_atoms, float(cutoff))
    coords = np.ascontiguousarray(ref.reshape(-1, 3).T)  # (3, B * M): gathers of one coordinate are contiguous
    present, owner = ref_mask.reshape(-1), group.reshape(-1)
    all_present = bool(present.all())
    found_i, found_j, found_d = [], [], []
    with _single_threaded_blas():  # entered once: switching BLAS threads costs ~0.3 ms
        for b in range(n_batch):
            weight = ref_mask[b, :, None]
            centre = (ref[b] * weight).sum(0) / max(int(weight.sum()), 1)
            approx = np.where(weight, ref[b] - centre, 0.0).astype(np.float32)  # absent atoms: dropped below
            sq = (approx * approx).sum(-1, keepdims=True)
            # d2 = |a|^2 + |b|^2 - 2 a.b as one GEMM: rows [a, |a|^2, 1] against columns [-2 b, 1, |b|^2].
            rows = np.concatenate([approx, sq, np.ones_like(sq)], axis=1)
            cols = np.ascontiguousarray(np.concatenate([-2.0 * approx, np.ones_like(sq), sq], axis=1).T)
            # float32 error of that sum is < ~1e-6 max |a|^2: a 1e-4 margin keeps every true pair.
            limit = cutoff * cutoff + 1e-4 * (1.0 + float(sq.max(initial=0.0)))
            for lo in range(0, n_atoms, chunk):
                # Upper triangle only: rows lo:lo+chunk against columns lo: (pairs i < j are kept below).
                width = n_atoms - lo
                flat = np.flatnonzero(_mm(rows[lo : lo + chunk], cols[:, lo:]) <= limit)
                i, j = np.divmod(flat, width)
                i += b * n_atoms + lo
                j += b * n_atoms + lo
                keep = (j > i) & (owner[i] != owner[j])
                if not all_present:
                    keep &= present[i] & present[j]
                i, j = i[keep], j[keep]
                d_ref = _distances(coords, i, j)
                close = d_ref <= cutoff
                found_i.append(i[close])
                found_j.append(j[close])
                found_d.append(d_ref[close])
    if not found_i:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


def _distances(coords: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(K,) |coords[:, i] - coords[:, j]| for (3, N) component-major coordinates."""
    diff = np.take(coords, i, axis=1)
    diff -= np.take(coords, j, axis=1)
    diff *= diff
    return np.sqrt(diff[0] + diff[1] + diff[2])


def _passed(d_ref: np.ndarray, d_model: np.ndarray, ok: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """(K,) number of thresholds t with |d_ref - d_model| <= t (0 where ``ok``, both atoms modelled, is False)."""
    diff = np.abs(d_ref - d_model)
    count = np.zeros(diff.shape, dtype=np.int8)
    for t in thresholds:  # one compare per threshold: cheaper than a (K, 4) expansion
        count += diff <= t
    count *= ok
    return count


def _lddt_counts(
    pred: np.ndarray,
    ref: np.ndarray,
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    group: np.ndarray,
    cutoff: float,
    thresholds: Sequence[float],
    pairs: tuple[np.ndarray, ...] | None = None,
    total: np.ndarray | None = None,
    rows: tuple[np.ndarray, ...] | None = None,
    per_atom: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom lDDT counts, the one lDDT core of the project.

    pred, ref: (..., M, 3) float64; pred_mask, ref_mask: (..., M) bool; group: (..., M) residue id (pairs
    within one residue are excluded). Returns ``preserved`` (..., M) = number of (pair, threshold) tests
    passed by pairs involving each atom, and ``total`` (..., M) = number of reference pairs of each atom
    (float64). A pair counts when both atoms are in the reference within ``cutoff`` (<=); it passes a
    threshold when both atoms are present in the model and | d_ref - d_model | <= threshold. ``pairs``:
    :func:`_contact_pairs` of the flattened batch, when the caller already has it; ``total``: its per-atom
    pair counts (:func:`_pair_totals`) and ``rows`` its :func:`_pair_rows` (properties of the reference alone).
    ``per_atom=False`` (one structure, no batch): ``preserved`` is (1,), the sum over atoms, which is all a
    global score needs (the compiled kernel then skips adding each pair to its two atoms).
    """
    shape = pred.shape[:-1]
    n_atoms = shape[-1]
    if pairs is None:
        pairs = _contact_pairs(ref.reshape(-1, n_atoms, 3), ref_mask.reshape(-1, n_atoms),
                               np.broadcast_to(group, shape).reshape(-1, n_atoms), cutoff)
    i, j, d_ref = pairs
    present = pred_mask.reshape(-1)
    size = present.shape[0]
    if total is None:
        total = _pair_totals(i, j, size)
    kernels = _kernels()
    per_atom = per_atom or len(shape) > 1  # a batch needs the counts of each of its elements
    if kernels is not None:
        starts, partners, row_d_ref = rows if rows is not None else _pair_rows(i, j, d_ref, size)
        preserved = np.zeros(size if per_atom else 0)
        passed = kernels.lddt_pair_counts(np.ascontiguousarray(pred.reshape(-1, 3)), np.ascontiguousarray(present),
                                          starts, partners, row_d_ref, np.asarray(thresholds, dtype=np.float64),
                                          preserved, per_atom)
        # Each unordered pair counts for both of its atoms.
        return (preserved.reshape(shape) if per_atom else np.array([2.0 * passed])), total.reshape(shape)
    coords = np.ascontiguousarray(pred.reshape(-1, 3).T)
    passed = _passed(d_ref, _distances(coords, i, j), present[i] & present[j], thresholds)
    preserved = np.bincount(i, passed, size) + np.bincount(j, passed, size)
    return (preserved.reshape(shape) if per_atom else preserved.sum(keepdims=True)), total.reshape(shape)


def _pair_rows(i: np.ndarray, j: np.ndarray, d_ref: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """The pair list as rows for the compiled kernel: atom a pairs with ``partners[starts[a]:starts[a + 1]]``
    at distances ``d_ref[starts[a]:starts[a + 1]]``.

    starts (size + 1,) int64, partners (K,) int32, d_ref (K,). :func:`_contact_pairs` emits pairs ordered by i
    already; any other order is sorted first (counts are sums of integers: the order of the pairs does not
    change them).
    """
    if i.size > 1 and (i[1:] < i[:-1]).any():
        order = np.argsort(i, kind="stable")
        i, j, d_ref = i[order], j[order], d_ref[order]
    starts = np.zeros(size + 1, dtype=np.int64)
    np.cumsum(np.bincount(i, minlength=size), out=starts[1:])
    return starts, j.astype(np.int32), np.ascontiguousarray(d_ref, dtype=np.float64)


def _pair_totals(i: np.ndarray, j: np.ndarray, size: int) -> np.ndarray:
    """(size,) float64: number of reference pairs of each atom (each unordered pair counts for both)."""
    return (np.bincount(i, minlength=size) + np.bincount(j, minlength=size)).astype(np.float64)


def _resolve_symmetry(pred: np.ndarray, pred_mask: np.ndarray, symmetric: dict,
                      thresholds: Sequence[float]) -> np.ndarray | None:
    """Which residues' symmetric side-chain atoms the model names the other way round (OST lDDTScorer rule).

    pred: (L, 37, 3) float64; pred_mask: (L, 37) bool; symmetric: the reference's :func:`_symmetry_pairs`.
    For each residue with a symmetric group, the group's atoms are scored against every non-symmetric
    reference atom of other residues under both namings; the swapped naming is kept only if strictly better.
    Decisions are independent per residue because only non-symmetric atoms are used as partners.
    Returns the (L,) bool residues to rename, or None when there is none.
    """
    n_res = pred.shape[0]
    own, swapped, other, d_ref, res_s = (symmetric[k] for k in ("own", "swapped", "other", "d_ref", "res_s"))
    present = pred_mask.reshape(-1)
    kernels = _kernels()
    if kernels is not None:
        gain = np.zeros(n_res)
        kernels.lddt_symmetry_gain(np.ascontiguousarray(pred.reshape(-1, 3)), np.ascontiguousarray(present),
                                   *symmetric["rows"], own, swapped, d_ref, np.asarray(thresholds, dtype=np.float64),
                                   res_s, gain)
        flip = gain > 0
    else:
        coords = np.ascontiguousarray(pred.reshape(-1, 3).T)

        def score(atom: np.ndarray) -> np.ndarray:
            passed = _passed(d_ref, _distances(coords, atom, other), present[atom] & present[other], thresholds)
            return np.bincount(res_s, passed, n_res)

        flip = score(swapped) > score(own)  # (L,)
    return flip if flip.any() else None


def _symmetry_pairs(atom_res: np.ndarray, atom_type: np.ndarray, aatype: np.ndarray,
                    pairs: tuple[np.ndarray, ...]) -> dict | None:
    """The reference's side of :func:`_resolve_symmetry` (None when it has no symmetric side chain atom).

    Pairs of one symmetric and one non-symmetric atom, oriented (symmetric s, other o) and ordered by o:
    ``res_s`` residue of s, ``own`` / ``swapped`` the flat atom37 index (L * 37) of s under the file's and the
    swapped naming, ``other`` that of o, ``d_ref`` their reference distance; ``rows`` (distinct o, (R + 1,)
    starts of their runs) for the compiled kernel. For all M reference atoms: ``atom_own`` /
    ``atom_swapped``, the flat index of the model atom each one is compared with under either naming.
    """
    n_types = rc.atom_type_num
    swap = _SWAP[np.minimum(aatype, rc.restype_num)]  # (L, 37)
    partner = swap[atom_res, atom_type]  # (M,) atom37 index each atom is renamed to
    is_sym = partner != atom_type
    if not is_sym.any():
        return None
    i, j, d_ref = pairs
    sym_i = is_sym[i]
    mixed = np.flatnonzero(sym_i != is_sym[j])  # one index for the four selections (cheaper than a mask each)
    i, j, d_ref, sym_i = i[mixed], j[mixed], d_ref[mixed], sym_i[mixed]
    s, o = np.where(sym_i, i, j), np.where(sym_i, j, i)
    order = np.argsort(o, kind="stable")
    s, o, d_ref = s[order], o[order], d_ref[order]
    atom_own, atom_swapped = atom_res * n_types + atom_type, atom_res * n_types + partner
    first = np.flatnonzero(np.diff(o, prepend=-1))  # where each o's run starts
    rows = (atom_own[o[first]], np.append(first, o.size).astype(np.int64))
    return {"res_s": atom_res[s], "own": atom_own[s], "swapped": atom_swapped[s], "other": atom_own[o],
            "d_ref": d_ref, "rows": rows, "atom_own": atom_own, "atom_swapped": atom_swapped}


def _finish(preserved: np.ndarray, total: np.ndarray, group: np.ndarray | None, n_groups: int,
            n_thresholds: int, per_residue: bool, empty: float) -> np.ndarray:
    """Global (...) or per-group (..., n_groups) lDDT from per-atom counts (..., M). `empty`: the score where
    the reference has no pair to check (a single residue): undefined (NaN) for scoring, 0 in training."""
    if not per_residue:
        pairs = total.sum(-1)
        return np.where(pairs > 0, preserved.sum(-1) / np.maximum(n_thresholds * pairs, 1e-12), empty)
    if group is not None:
        preserved = np.bincount(group, preserved, n_groups)
        total = np.bincount(group, total, n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = preserved / np.maximum(n_thresholds * total, 1e-12)
    return np.where(total > 0, score, empty)


def _numpy(x, dtype=None) -> np.ndarray:
    array = x.detach().cpu().numpy() if _is_tensor(x) else np.asarray(x)
    return array if dtype is None else array.astype(dtype, copy=False)


def lddt(
    pred_pos,
    ref_pos,
    pred_mask,
    ref_mask,
    aatype=None,
    ca_only: bool = False,
    per_residue: bool = False,
    cutoff: float = LDDT_INCLUSION_RADIUS,
    thresholds: Sequence[float] = LDDT_THRESHOLDS,
    contacts: tuple | None = None,
):
    """lDDT of a model against a reference, OpenStructure conventions.

    Args:
        pred_pos, ref_pos: (L, 37, 3) atom37 coordinates, residues already matched row by row
            (a reference residue missing in the model has pred_mask 0 there). For ``ca_only`` also
            (L, 3) CA coordinates.
        pred_mask, ref_mask: (L, 37) or (L,) atom masks.
        aatype: (L,) AF2 restypes; needed to resolve symmetric side chains (all-atom only).
        ca_only: use only CA atoms.
        per_residue: return (L,) per-residue scores (NaN for residues with no reference contact)
            instead of the global score.
    Pairs: reference atoms in different residues closer than ``cutoff`` (<= 15 Å); a pair passes a
    threshold t in (0.5, 1, 2, 4) when |d_ref - d_model| <= t; atoms missing in the model fail.
    The global score is the fraction of passed (pair, threshold) tests (not the mean of residues).
    NumPy or torch in; per-residue scores come back as the same kind (float64).
    contacts: :func:`lddt_contacts` of this reference (same ``ref_pos``, ``ref_mask``, ``ca_only`` and
    ``cutoff``): the pair search, most of the work, then runs once for many models of one reference.
    """
    pred = _numpy(pred_pos, np.float64)
    pmask = _numpy(pred_mask) > 0
    ca_only = ca_only or pred.ndim == 2
    if contacts is None:
        contacts = lddt_contacts(ref_pos, ref_mask, ca_only=ca_only, cutoff=cutoff,
                                 aatype=None if ca_only else aatype)
    kind, ref, rest = contacts[0], contacts[1], contacts[2:]
    if kind != ("ca" if ca_only else "all") or ref.shape[0] != pred.shape[0]:
        raise ValueError(f"lddt: contacts are for a {kind} reference of {ref.shape[0]} residues")
    if ca_only:
        if pred.ndim == 3:
            pred = pred[:, CA_INDEX]
        if pmask.ndim == 2:
            pmask = pmask[:, CA_INDEX]
        rmask, pairs, total, rows = rest
        group = np.arange(pred.shape[0])
        preserved, total = _lddt_counts(pred, ref, pmask, rmask, group, cutoff, thresholds, pairs=pairs, total=total,
                                        rows=rows, per_atom=per_residue)
        result = _finish(preserved, total, None, pred.shape[0], len(thresholds), per_residue, math.nan)
        return _like(result, pred_pos) if per_residue else float(result)
    n_res = pred.shape[0]
    atom_res, atom_type, pairs, total, contacts_aatype, symmetric, ref_atoms, rows = rest
    # The model atom compared with each reference atom: the same atom37 slot, or its symmetric partner in
    # the residues that score better renamed.
    source = None
    if aatype is not None:
        aatype = _numpy(aatype, np.int64)
        if contacts_aatype is None or not np.array_equal(contacts_aatype, aatype):
            symmetric = _symmetry_pairs(atom_res, atom_type, aatype, pairs)
        if symmetric is not None:
            flip = _resolve_symmetry(pred, pmask, symmetric, thresholds)
            if flip is not None:
                source = np.where(flip[atom_res], symmetric["atom_swapped"], symmetric["atom_own"])
    if source is None:
        pred_atoms, pred_present = pred[atom_res, atom_type], pmask[atom_res, atom_type]
    else:
        pred_atoms, pred_present = pred.reshape(-1, 3)[source], pmask.reshape(-1)[source]
    preserved, total = _lddt_counts(
        pred_atoms, ref_atoms, pred_present, np.ones(atom_res.shape, dtype=bool), atom_res, cutoff, thresholds,
        pairs=pairs, total=total, rows=rows, per_atom=per_residue,
    )
    result = _finish(preserved, total, atom_res, n_res, len(thresholds), per_residue, math.nan)
    return _like(result, pred_pos) if per_residue else float(result)


def lddt_contacts(ref_pos, ref_mask, ca_only: bool = False, cutoff: float = LDDT_INCLUSION_RADIUS,
                  aatype=None) -> tuple:
    """The reference's side of :func:`lddt`: its atoms, every pair within ``cutoff``, each atom's pair count and
    (with ``aatype``, all-atom) the symmetric side-chain pairs (an opaque tuple).

    ref_pos: (L, 37, 3) atom37 or (L, 3) CA coordinates; ref_mask: (L, 37) or (L,). Pass the result as
    ``lddt(..., contacts=)`` (with the same ``aatype``) when scoring several models against one reference.
    """
    ref, rmask = _numpy(ref_pos, np.float64), _numpy(ref_mask) > 0
    if ca_only or ref.ndim == 2:
        if ref.ndim == 3:
            ref = np.ascontiguousarray(ref[:, CA_INDEX])
        if rmask.ndim == 2:
            rmask = rmask[:, CA_INDEX]
        group = np.arange(ref.shape[0])
        pairs = _contact_pairs(ref[None], rmask[None], group[None], cutoff)
        size = ref.shape[0]
        return "ca", ref, rmask, pairs, _pair_totals(pairs[0], pairs[1], size), _pair_rows(*pairs, size)
    atom_res, atom_type = np.nonzero(rmask)  # only reference atoms take part
    ref_atoms = ref[atom_res, atom_type]
    size = atom_res.shape[0]
    pairs = _contact_pairs(ref_atoms[None], np.ones((1, size), dtype=bool), atom_res[None], cutoff)  # shared by both steps
    aatype = None if aatype is None else _numpy(aatype, np.int64).copy()  # kept: lddt compares the model's
    symmetric = None if aatype is None else _symmetry_pairs(atom_res, atom_type, aatype, pairs)
    return ("all", ref, atom_res, atom_type, pairs, _pair_totals(pairs[0], pairs[1], size), aatype, symmetric,
            ref_atoms, _pair_rows(*pairs, size))


def lddt_ca(
    pred_ca: torch.Tensor,
    ref_ca: torch.Tensor,
    mask: torch.Tensor,
    per_residue: bool = False,
    cutoff: float = LDDT_INCLUSION_RADIUS,
    pred_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched CA-lDDT for training/validation (same core as :func:`lddt`).

    Args:
        pred_ca, ref_ca: (B, L, 3) CA coordinates in Å; mask: (B, L) 1 = residue present in the reference
        (padding 0); pred_mask: (B, L) model presence (default: all present).
    Returns:
        (B,) global CA-lDDT, or (B, L) per residue when ``per_residue`` (0 where a residue has no
        reference contact or is masked), on the input's device in its float dtype (at least float32).
        No gradient (lDDT is a count). Computed in float64 by the NumPy core on the CPU (CA pair lists
        are small: a host copy of (B, L, 3) per call).
    """
    import torch  # the inputs are tensors: torch is loaded already

    ref_mask = _numpy(mask) > 0
    pmask = np.ones_like(ref_mask) if pred_mask is None else _numpy(pred_mask) > 0
    group = np.arange(pred_ca.shape[-2])
    preserved, total = _lddt_counts(_numpy(pred_ca, np.float64), _numpy(ref_ca, np.float64), pmask, ref_mask,
                                    group, cutoff, LDDT_THRESHOLDS)
    result = _finish(preserved, total, None, pred_ca.shape[-2], len(LDDT_THRESHOLDS), per_residue, 0.0)
    dtype = torch.promote_types(pred_ca.dtype, torch.float32)
    return torch.from_numpy(np.asarray(result)).to(pred_ca.device, dtype)
