"""Structure metrics: Kabsch superposition, TM-score / GDT (TMscore search), RMSD and lDDT.

Every function takes NumPy arrays or torch tensors (``(..., N, 3)`` coordinates in Å, masks with
1 = present) and returns the same kind it was given. One implementation of each piece of math:

- :func:`kabsch` - the project's only optimal superposition (weighted, proper rotation).
- :func:`tm_score` / :func:`tm_score_batch` - TM-score, GDT-TS, GDT-HA and RMSD with residue
  correspondence fixed by the caller, maximised over superpositions by the Zhang-Skolnick search of the
  ``TMscore`` program (version 2019/08/22, see docs/metrics.md for the exact rules reproduced).
- :func:`lddt` - all-atom or CA lDDT, OpenStructure conventions (symmetric side chains resolved).
- :func:`lddt_ca` - batched CA-lDDT on torch tensors for training / validation.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from transformers.models.esm.openfold_utils import residue_constants as rc

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
def _to_torch(x, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def _like(result: torch.Tensor, template):
    """Return ``result`` as the kind (NumPy / torch) of ``template``."""
    if isinstance(template, torch.Tensor):
        return result
    return result.detach().cpu().numpy()


# ------------------------------------------------------------------------------------------------ Kabsch
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
    dtype = P.dtype if isinstance(P, torch.Tensor) and P.is_floating_point() else torch.float64
    p, q = _to_torch(P, dtype), _to_torch(Q, dtype)
    w = torch.ones(p.shape[:-1], dtype=dtype, device=p.device) if mask is None else _to_torch(mask, dtype)
    w = w.to(p.device)
    total = w.sum(-1, keepdim=True)  # (..., 1)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    p_mean = (w[..., None] * p).sum(-2) / safe
    q_mean = (w[..., None] * q).sum(-2) / safe
    pc, qc = p - p_mean[..., None, :], q - q_mean[..., None, :]
    h = (w[..., None] * pc).transpose(-1, -2) @ qc  # (..., 3, 3) covariance, sum_i w_i p_i q_i^T
    u, _, vh = torch.linalg.svd(h)
    sign = torch.sign(torch.linalg.det(vh.transpose(-1, -2) @ u.transpose(-1, -2)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    diag = torch.ones(sign.shape + (3,), dtype=dtype, device=p.device)
    diag[..., 2] = sign
    rot = vh.transpose(-1, -2) @ (diag[..., None] * u.transpose(-1, -2))
    empty = (total[..., 0] <= 0)[..., None, None]
    rot = torch.where(empty, torch.eye(3, dtype=dtype, device=p.device).expand_as(rot), rot)
    trans = q_mean - (p_mean[..., None, :] @ rot.transpose(-1, -2))[..., 0, :]
    trans = torch.where(empty[..., 0], torch.zeros_like(trans), trans)
    return _like(rot, P), _like(trans, P)


def superpose(P, R, t):
    """Apply ``(R, t)`` from :func:`kabsch` to ``P`` (..., N, 3)."""
    if isinstance(P, torch.Tensor):
        return P @ R.transpose(-1, -2) + t[..., None, :]
    return np.asarray(P) @ np.swapaxes(R, -1, -2) + np.asarray(t)[..., None, :]


def rmsd(P, Q, mask=None, superimpose: bool = True):
    """RMSD (Å) between matched rows of P and Q (..., N, 3) over ``mask``, after Kabsch if ``superimpose``."""
    p, q = _to_torch(P, torch.float64), _to_torch(Q, torch.float64)
    w = torch.ones(p.shape[:-1], dtype=torch.float64) if mask is None else _to_torch(mask, torch.float64)
    if superimpose:
        rot, trans = kabsch(p, q, w)
        p = superpose(p, rot, trans)
    sq = ((p - q) ** 2).sum(-1)
    value = torch.sqrt((w * sq).sum(-1) / w.sum(-1).clamp(min=1e-12))
    return _like(value, P) if value.ndim else float(value)


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


def _pair_features(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, 16) per-pair features [vec(x y^T) (9), x (3), y (3), 1].

    ``mask @ F`` gives every sum a weighted Kabsch fit needs, and ``A @ F^T`` with the coefficients of
    :func:`_distance_coefficients` gives squared distances: both steps of the search become one GEMM.
    """
    outer = (x[:, :, None] * y[:, None, :]).reshape(-1, 9)
    return torch.cat([outer, x, y, torch.ones_like(x[:, :1])], dim=1)


def _fit_from_sums(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kabsch (R, t) from (C, 16) weighted sums [sum w x y^T, sum w x, sum w y, sum w] (see kabsch)."""
    weight = sums[:, 15:16]
    safe = torch.where(weight > 0, weight, torch.ones_like(weight))
    x_mean, y_mean = sums[:, 9:12] / safe, sums[:, 12:15] / safe
    cov = sums[:, :9].reshape(-1, 3, 3) - weight[:, :, None] * x_mean[:, :, None] * y_mean[:, None, :]
    u, _, vh = torch.linalg.svd(cov)
    sign = torch.sign(torch.linalg.det(vh.transpose(-1, -2) @ u.transpose(-1, -2)))
    u = u.clone()
    u[:, :, 2] *= torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]
    rot = vh.transpose(-1, -2) @ u.transpose(-1, -2)
    empty = weight[:, 0] <= 0
    rot = torch.where(empty[:, None, None], torch.eye(3, dtype=rot.dtype).expand_as(rot), rot)
    trans = y_mean - (rot @ x_mean[:, :, None])[:, :, 0]
    trans = torch.where(empty[:, None], torch.zeros_like(trans), trans)
    return rot, trans


def _distance_coefficients(rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """(C, 16) A with |R x_n + t - y_n|^2 = (A F^T)[c, n] + |x_n|^2 + |y_n|^2 (F from _pair_features)."""
    return torch.cat(
        [
            -2.0 * rot.transpose(-1, -2).reshape(-1, 9),  # -2 y^T R x = -2 sum_ij R_ij y_i x_j
            2.0 * (rot.transpose(-1, -2) @ trans[:, :, None])[:, :, 0],
            -2.0 * trans,
            (trans * trans).sum(-1, keepdim=True),
        ],
        dim=1,
    )


def _tm_search(x: torch.Tensor, y: torch.Tensor, l_ref: float, max_iter: int = 20) -> dict:
    """Zhang-Skolnick search of TMscore for one pair, every candidate superposition in one batch.

    x, y: (n, 3) float64 aligned CA pairs in order. Each seed (every window of every fragment length)
    is fitted, scored, and extended: pairs closer than d0_search - 1 (then d0_search + 1) Å define the
    next fit, widened by 0.5 Å until >= 3 pairs, for up to ``max_iter`` rounds or until the pair set is
    unchanged. Candidates that reach the same pair set at the same round are merged (their futures are
    identical). TM-score and every GDT count are maximised over all fits.
    Returns ``tm`` (float) and ``gdt`` (5,) best counts for 0.5/1/2/4/8 Å.
    """
    n = x.shape[0]
    x = x - x.mean(0)  # centring keeps the expanded distance formula precise
    y = y - y.mean(0)
    d0 = tm_d0(l_ref)
    d0_search = min(max(d0, 4.5), 8.0)
    feats = _pair_features(x, y)  # (n, 16)
    feats_t = feats.transpose(0, 1).contiguous()
    norms = (x * x).sum(-1) + (y * y).sum(-1)  # (n,)
    cut2 = torch.tensor(_GDT_CUTOFFS, dtype=x.dtype) ** 2

    # Seeds: every window of every length; their sums come from prefix sums in O(1) each.
    prefix = torch.cat([torch.zeros_like(feats[:1]), feats.cumsum(0)])
    starts, lengths = [], []
    for length in _seed_lengths(n):
        s = torch.arange(n - length + 1)
        starts.append(s)
        lengths.append(torch.full_like(s, length))
    start, length = torch.cat(starts), torch.cat(lengths)
    sums = prefix[start + length] - prefix[start]
    mask = None  # the seed windows are only materialised if needed (never: no convergence test at step 0)

    best_tm = -1.0
    best_gdt = torch.full((len(_GDT_CUTOFFS),), -1, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    hash_weights = torch.randint(-(2**62), 2**62, (n,), generator=generator, dtype=torch.long)
    inv_d02 = 1.0 / (d0 * d0)
    seen = torch.zeros(0, dtype=torch.long)

    for step in range(max_iter + 1):
        rot, trans = _fit_from_sums(sums)
        dist2 = (_distance_coefficients(rot, trans) @ feats_t + norms).clamp_(min=0.0)  # (C, n)
        for k in range(len(_GDT_CUTOFFS)):
            best_gdt[k] = max(int(best_gdt[k]), int(torch.count_nonzero(dist2 <= cut2[k], dim=-1).max()))
        # Pairs closer than d0_search -/+ 1 define the next fit; widen by 0.5 A until >= 3 pairs.
        base = d0_search + (1.0 if step > 0 else -1.0)
        new_mask = dist2 < base * base
        if n > 3 and step < max_iter:
            few = torch.count_nonzero(new_mask, dim=-1) < 3
            if bool(few.any()):
                third = torch.kthvalue(dist2[few], 3, dim=-1).values.sqrt()
                cutoff = base + 0.5 * (torch.floor((third - base) / 0.5) + 1.0)
                new_mask[few] = dist2[few] < (cutoff * cutoff)[:, None]
        tm_terms = torch.reciprocal_(dist2.mul_(inv_d02).add_(1.0))  # in place: dist2 is not used below
        best_tm = max(best_tm, float(tm_terms.sum(-1).max()) / l_ref)
        if step == max_iter:
            break
        if mask is not None:  # candidates whose pair set did not change have converged
            moving = (new_mask != mask).any(-1)
            new_mask = new_mask[moving]
        if new_mask.shape[0] == 0:
            break
        # A pair set already reached (at this round or an earlier one, i.e. with at least as many rounds
        # left) has a known future: fits are a function of the pair set alone. Follow each set once.
        keys = (new_mask.long() * hash_weights).sum(-1)
        unique, inverse = torch.unique(keys, return_inverse=True)
        first = torch.full((unique.numel(),), new_mask.shape[0], dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(new_mask.shape[0]), reduce="amin")
        fresh = ~torch.isin(unique, seen)
        seen = torch.cat([seen, unique[fresh]])
        mask = new_mask[first[fresh]]
        if mask.shape[0] == 0:
            break
        sums = mask.to(feats.dtype) @ feats
    return {"tm": best_tm, "gdt": best_gdt}


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
    x = _to_torch(pred_ca, torch.float64)
    y = _to_torch(ref_ca, torch.float64)
    n_batch, width = x.shape[:2]
    valid = torch.ones((n_batch, width), dtype=torch.bool) if mask is None else _to_torch(mask).bool()
    n_ali = valid.sum(-1)
    if (n_ali == 0).any():
        raise ValueError("tm_score: no aligned residue pairs (mask is empty)")
    l_ref_t = torch.full((n_batch,), float(width), dtype=torch.float64) if l_ref is None else (
        _to_torch(l_ref, torch.float64).reshape(n_batch)
    )
    results = []
    for b in range(n_batch):
        keep = valid[b]
        xb, yb = x[b][keep], y[b][keep]  # aligned pairs, in row order
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the search is many small ops: extra threads only add sync overhead
        try:
            found = _tm_search(xb, yb, float(l_ref_t[b]), max_iter=max_iter)
        finally:
            torch.set_num_threads(previous_threads)
        frac = found["gdt"].to(torch.float64) / l_ref_t[b]  # 0.5, 1, 2, 4, 8 Å
        results.append(
            {
                "tm_score": float(found["tm"]),
                "gdt_ts": float(frac[1:5].mean()),
                "gdt_ha": float(frac[0:4].mean()),
                "rmsd": float(rmsd(xb, yb)),
                "n_aligned": int(n_ali[b]),
                "l_ref": int(l_ref_t[b]),
            }
        )
    return results


def tm_score(pred_ca, ref_ca, mask=None, l_ref: int | None = None, max_iter: int = 20) -> dict:
    """TM-score / GDT-TS / GDT-HA / RMSD of one model against its reference (see :func:`tm_score_batch`).

    pred_ca, ref_ca: (N, 3) matched CA rows; mask: (N,) aligned pairs; l_ref: reference length
    (default N - pass the full reference length when the rows cover only the aligned residues).
    """
    x = _to_torch(pred_ca, torch.float64)[None]
    y = _to_torch(ref_ca, torch.float64)[None]
    m = None if mask is None else _to_torch(mask).bool()[None]
    lengths = None if l_ref is None else [l_ref]
    return tm_score_batch(x, y, m, lengths, max_iter=max_iter)[0]


# ------------------------------------------------------------------------------------------------- lDDT
def _lddt_counts(
    pred: torch.Tensor,
    ref: torch.Tensor,
    pred_mask: torch.Tensor,
    ref_mask: torch.Tensor,
    group: torch.Tensor,
    cutoff: float,
    thresholds: Sequence[float],
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-atom lDDT counts, the one lDDT core of the project.

    pred, ref: (..., M, 3); pred_mask, ref_mask: (..., M) bool; group: (..., M) residue id (pairs within
    one residue are excluded). Returns ``preserved`` (..., M) = number of (pair, threshold) tests passed
    by pairs involving each atom, and ``total`` (..., M) = number of reference pairs of each atom.
    A pair counts when both atoms are in the reference within ``cutoff`` (<=); it passes a threshold when
    both atoms are present in the model and | d_ref - d_model | <= threshold.
    """
    thr = torch.as_tensor(thresholds, dtype=pred.dtype, device=pred.device)
    n_atoms = pred.shape[-2]
    preserved, total = [], []
    for lo in range(0, n_atoms, chunk):
        hi = min(lo + chunk, n_atoms)
        d_ref = torch.cdist(ref[..., lo:hi, :], ref)
        d_pred = torch.cdist(pred[..., lo:hi, :], pred)
        pairs = (
            (d_ref <= cutoff)
            & ref_mask[..., lo:hi, None]
            & ref_mask[..., None, :]
            & (group[..., lo:hi, None] != group[..., None, :])
        )
        both = pairs & pred_mask[..., lo:hi, None] & pred_mask[..., None, :]
        diff = (d_ref - d_pred).abs()
        passed = ((diff[..., None] <= thr) & both[..., None]).sum((-1, -2))
        preserved.append(passed.to(pred.dtype))
        total.append(pairs.sum(-1).to(pred.dtype))
    return torch.cat(preserved, -1), torch.cat(total, -1)


def _resolve_symmetry(
    pred: torch.Tensor, pred_mask: torch.Tensor, ref: torch.Tensor, ref_mask: torch.Tensor, aatype: torch.Tensor,
    cutoff: float, thresholds: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rename symmetric side-chain atoms of the model where that scores better (OST lDDTScorer rule).

    pred/ref: (L, 37, 3); masks: (L, 37) bool; aatype (L,). For each residue with a symmetric group, the
    group's atoms are scored against every non-symmetric reference atom of other residues under both
    namings; the swapped naming is kept only if strictly better. Decisions are independent per residue
    because only non-symmetric atoms are used as partners.
    """
    swap = torch.as_tensor(_SWAP, device=pred.device)[aatype.clamp(max=rc.restype_num)]  # (L, 37)
    is_sym = (swap != torch.arange(rc.atom_type_num, device=pred.device)) & ref_mask
    if not bool(is_sym.any()):
        return pred, pred_mask
    sym_res, sym_atom = torch.nonzero(is_sym, as_tuple=True)
    partner = swap[sym_res, sym_atom]
    others = ref_mask & ~is_sym
    o_res, o_atom = torch.nonzero(others, as_tuple=True)
    thr = torch.as_tensor(thresholds, dtype=pred.dtype, device=pred.device)

    d_ref = torch.cdist(ref[sym_res, sym_atom], ref[o_res, o_atom])  # (K, J)
    close = (d_ref <= cutoff) & (sym_res[:, None] != o_res[None, :])
    partners_ok = pred_mask[o_res, o_atom][None, :]

    def passed(atom: torch.Tensor) -> torch.Tensor:
        d_pred = torch.cdist(pred[sym_res, atom], pred[o_res, o_atom])
        ok = close & partners_ok & pred_mask[sym_res, atom][:, None]
        return (((d_ref - d_pred).abs()[..., None] <= thr) & ok[..., None]).sum((-1, -2))

    as_is, swapped = passed(sym_atom), passed(partner)
    n_res = pred.shape[0]
    score_as_is = torch.zeros(n_res, dtype=torch.long, device=pred.device).index_add_(0, sym_res, as_is)
    score_swapped = torch.zeros(n_res, dtype=torch.long, device=pred.device).index_add_(0, sym_res, swapped)
    flip = score_swapped > score_as_is  # (L,)
    if not bool(flip.any()):
        return pred, pred_mask
    index = torch.where(flip[:, None], swap, torch.arange(rc.atom_type_num, device=pred.device))
    pred = torch.take_along_dim(pred, index[..., None], dim=1)
    pred_mask = torch.take_along_dim(pred_mask, index, dim=1)
    return pred, pred_mask


def _finish(preserved: torch.Tensor, total: torch.Tensor, group: torch.Tensor | None, n_groups: int,
            n_thresholds: int, per_residue: bool, empty: float):
    if not per_residue:
        return preserved.sum(-1) / (n_thresholds * total.sum(-1)).clamp(min=1e-12)
    if group is not None:
        shape = preserved.shape[:-1] + (n_groups,)
        preserved = torch.zeros(shape, dtype=preserved.dtype, device=preserved.device).index_add_(
            -1, group, preserved)
        total = torch.zeros(shape, dtype=total.dtype, device=total.device).index_add_(-1, group, total)
    score = preserved / (n_thresholds * total).clamp(min=1e-12)
    return torch.where(total > 0, score, torch.full_like(score, empty))


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
    """
    pred = _to_torch(pred_pos, torch.float64)
    ref = _to_torch(ref_pos, torch.float64)
    pmask = _to_torch(pred_mask).bool()
    rmask = _to_torch(ref_mask).bool()
    if ca_only or pred.ndim == 2:
        if pred.ndim == 3:
            pred, ref = pred[:, CA_INDEX], ref[:, CA_INDEX]
        if pmask.ndim == 2:
            pmask, rmask = pmask[:, CA_INDEX], rmask[:, CA_INDEX]
        group = torch.arange(pred.shape[0])
        preserved, total = _lddt_counts(pred, ref, pmask, rmask, group, cutoff, thresholds)
        result = _finish(preserved, total, None, pred.shape[0], len(thresholds), per_residue, math.nan)
        return _like(result, pred_pos) if per_residue else float(result)
    n_res = pred.shape[0]
    if aatype is not None:
        pred, pmask = _resolve_symmetry(pred, pmask, ref, rmask, _to_torch(aatype).long(), cutoff, thresholds)
    res_of_atom = torch.arange(n_res)[:, None].expand(n_res, rc.atom_type_num)
    keep = rmask.reshape(-1)  # only reference atoms take part
    group = res_of_atom.reshape(-1)[keep]
    preserved, total = _lddt_counts(
        pred.reshape(-1, 3)[keep], ref.reshape(-1, 3)[keep], pmask.reshape(-1)[keep],
        torch.ones_like(group, dtype=torch.bool), group, cutoff, thresholds,
    )
    result = _finish(preserved, total, group, n_res, len(thresholds), per_residue, math.nan)
    return _like(result, pred_pos) if per_residue else float(result)


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
        reference contact or is masked). No gradient (lDDT is a count).
    """
    with torch.no_grad():
        ref_mask = mask.bool()
        pmask = torch.ones_like(ref_mask) if pred_mask is None else pred_mask.bool()
        dtype = torch.promote_types(pred_ca.dtype, torch.float32)
        group = torch.arange(pred_ca.shape[-2], device=pred_ca.device).expand(ref_mask.shape)
        preserved, total = _lddt_counts(
            pred_ca.detach().to(dtype), ref_ca.detach().to(dtype), pmask, ref_mask, group, cutoff, LDDT_THRESHOLDS
        )
        return _finish(preserved, total, None, pred_ca.shape[-2], len(LDDT_THRESHOLDS), per_residue, 0.0)
