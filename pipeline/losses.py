"""Structure losses for fine-tuning ESMFold (AlphaFold2 supplement §1.9; defaults from openfold's config).

Every loss takes ESMFold output tensors plus ground truth from `pipeline.features.make_ground_truth`,
states its masks and units, and returns a scalar: a masked mean per example, then the mean over the
batch (as openfold does), so padded residues never count and a short chain weighs as much as a long one.

ESMFold outputs used (`EsmForProteinFoldingOutput`, n_sm = structure-module layers):
    frames (n_sm, B, L, 7)              quaternion (w, x, y, z) + translation, Å
    sidechain_frames (n_sm, B, L, 8, 4, 4)  rigid-group frames, Å
    positions (n_sm, B, L, 14, 3)       atom14 coordinates, Å
    angles, unnormalized_angles (n_sm, B, L, 7, 2)   (sin, cos) of pre-omega, phi, psi, chi1..4
    distogram_logits (B, L, L, 64)
    lddt_head (n_sm, B, L, 37, 50)      per-atom37 pLDDT logits (CA = atom 1)

Precision: every loss is computed in fp32 with autocast off, whatever the training precision: predictions
are cast up to fp32, ground truth is never cast down (under bf16 autocast the FAPE einsums alone lose
~1e-2 relative on real chains).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.esm.openfold_utils import Rigid
from transformers.models.esm.openfold_utils import residue_constants as rc

from pipeline.features import make_ground_truth
from pipeline.metrics import lddt_ca

__all__ = [
    "DEFAULT_WEIGHTS",
    "backbone_fape",
    "chi_loss",
    "compute_fape",
    "distogram_loss",
    "folding_loss",
    "plddt_loss",
    "rename_symmetric_ground_truth",
    "sidechain_fape",
]

DEFAULT_WEIGHTS: dict[str, float] = {"fape_bb": 0.5, "fape_sc": 0.5, "distogram": 0.3, "plddt": 0.01, "chi": 1.0}
_CA = rc.atom_order["CA"]  # index 1 in both atom37 and atom14


def fp32_loss(fn):
    """Run a loss with autocast off (CPU, and CUDA when present), so every op runs in its inputs' dtype, which
    the loss casts up to fp32 first."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast(device_type="cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast(device_type="cuda", enabled=False))
            return fn(*args, **kwargs)

    return wrapper


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """sum(values·mask)/sum(mask) over `dims`; 0 where the mask is empty (no NaN)."""
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1.0)


def _as_4x4(frames: torch.Tensor) -> torch.Tensor:
    """Frames as (..., 4, 4) from either tensor_7 (..., 7) (normalised quaternion + translation) or (..., 4, 4)."""
    if frames.shape[-1] == 7:
        return Rigid.from_tensor_7(frames).to_tensor_4x4()
    if frames.shape[-2:] == (4, 4):
        return frames
    raise ValueError(f"frames: expected (..., 7) or (..., 4, 4), got {tuple(frames.shape)}")


@fp32_loss
def compute_fape(
    pred_frames: torch.Tensor,
    true_frames: torch.Tensor,
    frame_mask: torch.Tensor,
    pred_points: torch.Tensor,
    true_points: torch.Tensor,
    point_mask: torch.Tensor,
    clamp_distance: float | None = 10.0,
    length_scale: float = 10.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Frame-aligned point error, AF2 Alg. 28.

    Every point j is expressed in every frame i, predicted and true:
    `d_ij = sqrt(|T_i^-1 x_j - T_i^true^-1 x_j^true|^2 + eps)`, clamped at `clamp_distance` Å
    (None: unclamped), divided by `length_scale` Å and averaged over pairs with frame_mask_i·point_mask_j.

    Args:
        pred_frames, true_frames: (*, F, 4, 4) frames, translations in Å.
        frame_mask: (*, F).
        pred_points, true_points: (*, P, 3) Å.
        point_mask: (*, P).
    Returns: (*) FAPE in units of `length_scale` (the value at a perfect prediction is sqrt(eps)/length_scale).
    """

    def local(frames: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        rot, trans = frames[..., :3, :3], frames[..., :3, 3]
        offsets = points[..., None, :, :] - trans[..., :, None, :]  # (*, F, P, 3)
        return torch.einsum("...fji,...fpj->...fpi", rot, offsets)  # R^T (x - t)

    pred_frames, pred_points = pred_frames.float(), pred_points.float()
    true_frames, true_points = true_frames.float(), true_points.float()
    frame_mask, point_mask = frame_mask.float(), point_mask.float()
    error = torch.sqrt(torch.sum((local(pred_frames, pred_points) - local(true_frames, true_points)) ** 2, dim=-1) + eps)
    if clamp_distance is not None:
        error = torch.clamp(error, max=clamp_distance)
    pair_mask = frame_mask[..., :, None] * point_mask[..., None, :]
    return _masked_mean(error / length_scale, pair_mask, dims=(-2, -1))


@fp32_loss
def backbone_fape(
    pred_frames: torch.Tensor,
    gt_frames: torch.Tensor,
    frame_mask: torch.Tensor,
    clamp_distance: float | None = 10.0,
    length_scale: float = 10.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Backbone FAPE averaged over structure-module layers (AF2 §1.9.2, Alg. 20 line 17).

    The points are the frame origins (CA atoms), so this compares the backbone frames only.

    Args:
        pred_frames: (n_sm, B, L, 7) ESMFold `frames` (tensor_7, Å), or (B, L, 7), or the same as 4x4.
        gt_frames: (B, L, 4, 4) `backbone_frames` from make_ground_truth (or tensor_7).
        frame_mask: (B, L) `backbone_rigid_mask` (N, CA, C observed; padding = 0).
    Returns: scalar, units of `length_scale` (10 Å); ≈ sqrt(eps)/length_scale = 0.001 at the truth.
    """
    pred = _as_4x4(pred_frames.float())
    if pred.dim() == 4:
        pred = pred[None]
    truth = _as_4x4(gt_frames.float())
    mask = frame_mask.float()
    per_layer = compute_fape(
        pred, truth[None], mask[None], pred[..., :3, 3], truth[None, ..., :3, 3], mask[None],
        clamp_distance=clamp_distance, length_scale=length_scale, eps=eps,
    )  # (n_sm, B)
    return per_layer.mean()


def _ambiguous_slots() -> slice:
    """The atom14 columns that hold symmetric atoms in any residue type (6..9: OD*/OE*/CD*/CE*)."""
    columns = np.nonzero(np.asarray(rc.restype_atom14_ambiguous_atoms).any(axis=0))[0]
    return slice(int(columns.min()), int(columns.max()) + 1)


_AMBIGUOUS_SLOTS = _ambiguous_slots()


@torch.no_grad()
@fp32_loss
def rename_symmetric_ground_truth(
    pred_positions: torch.Tensor, ground_truth: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """AF2 Alg. 26 renameSymmetricGroundTruthAtoms.

    For each residue with symmetric atoms (ASP OD1/OD2, GLU OE1/OE2, PHE and TYR CD1/CD2 + CE1/CE2)
    choose the ground-truth naming whose distances from the ambiguous atoms to all non-ambiguous atoms
    of the chain agree better with the prediction (sum of |d_pred - d_true| over observed atoms).

    Args:
        pred_positions: (B, L, 14, 3) predicted atom14 positions, Å.
        ground_truth: make_ground_truth output (atom14_gt_positions/_exists, atom14_alt_gt_positions/
            _exists, atom14_atom_is_ambiguous, rigidgroups_gt_frames, rigidgroups_alt_gt_frames).
    Returns: alt_naming_is_better (B, L) 0/1, renamed_atom14_gt_positions (B, L, 14, 3),
        renamed_atom14_gt_exists (B, L, 14), renamed_rigidgroups_gt_frames (B, L, 8, 4, 4).
    """
    gt_pos = ground_truth["atom14_gt_positions"]
    alt_pos = ground_truth["atom14_alt_gt_positions"]
    gt_exists = ground_truth["atom14_gt_exists"]
    ambiguous = ground_truth["atom14_atom_is_ambiguous"]
    batch, length = gt_pos.shape[:2]
    pred = pred_positions.detach().float()
    gt_pos, alt_pos = gt_pos.float(), alt_pos.float()

    # Ambiguous atoms occupy a few fixed atom14 slots (6..9); compare only those against all atoms.
    slots = _AMBIGUOUS_SLOTS
    anchors = (gt_exists * (1.0 - ambiguous)).reshape(batch, 1, 1, length * 14)
    probes = (gt_exists * ambiguous)[:, :, slots, None]  # (B, L, S, 1)

    def distances(points: torch.Tensor) -> torch.Tensor:  # (B, L, S, L*14)
        probe = points[:, :, slots].reshape(batch, -1, 3)
        dist = torch.cdist(probe, points.reshape(batch, -1, 3), compute_mode="donot_use_mm_for_euclid_dist")
        return dist.view(batch, length, -1, length * 14)

    pred_d = distances(pred)
    weight = probes * anchors
    gt_error = ((pred_d - distances(gt_pos)).abs() * weight).sum(dim=(-1, -2))
    alt_error = ((pred_d - distances(alt_pos)).abs() * weight).sum(dim=(-1, -2))
    alt_better = (alt_error < gt_error).to(gt_pos.dtype)  # (B, L)

    use_alt = alt_better.bool()
    return {
        "alt_naming_is_better": alt_better,
        "renamed_atom14_gt_positions": torch.where(use_alt[..., None, None], alt_pos, gt_pos),
        "renamed_atom14_gt_exists": torch.where(use_alt[..., None], ground_truth["atom14_alt_gt_exists"], gt_exists),
        "renamed_rigidgroups_gt_frames": torch.where(
            use_alt[..., None, None, None],
            ground_truth["rigidgroups_alt_gt_frames"],
            ground_truth["rigidgroups_gt_frames"],
        ),
    }


@fp32_loss
def sidechain_fape(
    pred_sidechain_frames: torch.Tensor,
    pred_positions: torch.Tensor,
    ground_truth: Mapping[str, torch.Tensor],
    clamp_distance: float | None = 10.0,
    length_scale: float = 10.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """All-atom FAPE of the final structure-module layer (AF2 §1.9.2, Alg. 20 line 28).

    Every rigid group frame (8 per residue; the backbone, psi and chi frames that exist and whose atoms
    are observed) against every observed atom14 atom, after renaming symmetric ground-truth atoms to the
    naming closer to the prediction (Alg. 26).

    Args:
        pred_sidechain_frames: (n_sm, B, L, 8, 4, 4) or (B, L, 8, 4, 4), Å.
        pred_positions: (n_sm, B, L, 14, 3) or (B, L, 14, 3), Å.
        ground_truth: make_ground_truth output (masks: rigidgroups_gt_exists, renamed atom14_gt_exists).
    Returns: scalar, units of `length_scale` (10 Å).
    """
    if pred_sidechain_frames.dim() == 6:
        pred_sidechain_frames = pred_sidechain_frames[-1]
    if pred_positions.dim() == 5:
        pred_positions = pred_positions[-1]
    batch, length = pred_positions.shape[:2]
    pred_positions, pred_sidechain_frames = pred_positions.float(), pred_sidechain_frames.float()
    renamed = rename_symmetric_ground_truth(pred_positions, ground_truth)
    dtype = torch.float32
    fape = compute_fape(
        pred_sidechain_frames.reshape(batch, length * 8, 4, 4),
        renamed["renamed_rigidgroups_gt_frames"].reshape(batch, length * 8, 4, 4).to(dtype),
        ground_truth["rigidgroups_gt_exists"].reshape(batch, length * 8).to(dtype),
        pred_positions.reshape(batch, length * 14, 3),
        renamed["renamed_atom14_gt_positions"].reshape(batch, length * 14, 3).to(dtype),
        renamed["renamed_atom14_gt_exists"].reshape(batch, length * 14).to(dtype),
        clamp_distance=clamp_distance, length_scale=length_scale, eps=eps,
    )
    return fape.mean()


@fp32_loss
def distogram_loss(
    logits: torch.Tensor,
    pseudo_beta: torch.Tensor,
    pseudo_beta_mask: torch.Tensor,
    min_bin: float = 2.3125,
    max_bin: float = 21.6875,
    no_bins: int = 64,
) -> torch.Tensor:
    """Distogram cross-entropy (AF2 §1.9.8).

    The true bin of pair (i, j) counts how many of the `no_bins - 1` boundaries
    `linspace(min_bin, max_bin, no_bins - 1)` Å lie below the pseudo-β distance (last bin: beyond max_bin).

    Args:
        logits: (B, L, L, no_bins) ESMFold `distogram_logits`.
        pseudo_beta: (B, L, 3) Å (CB, CA for glycine); pseudo_beta_mask: (B, L).
    Returns: scalar, nats, averaged over pairs with both pseudo-β atoms observed (i = j included, as in AF2).
    """
    boundaries = torch.linspace(min_bin, max_bin, no_bins - 1, device=logits.device, dtype=torch.float32)
    dist_sq = torch.sum((pseudo_beta[..., :, None, :] - pseudo_beta[..., None, :, :]).float() ** 2, dim=-1)
    true_bins = torch.sum(dist_sq[..., None] > boundaries**2, dim=-1)  # (B, L, L)
    errors = F.cross_entropy(logits.movedim(-1, 1).float(), true_bins, reduction="none")
    pseudo_beta_mask = pseudo_beta_mask.float()
    pair_mask = pseudo_beta_mask[..., :, None] * pseudo_beta_mask[..., None, :]
    return _masked_mean(errors, pair_mask, dims=(-2, -1)).mean()


@fp32_loss
def plddt_loss(
    lddt_logits_ca: torch.Tensor,
    pred_ca: torch.Tensor,
    true_ca: torch.Tensor,
    ca_mask: torch.Tensor,
    cutoff: float = 15.0,
    no_bins: int = 50,
    example_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """pLDDT head loss, AF2 Alg. 29 predictPerResidueLDDT_Ca.

    Target: bin = floor(lddt_ca · no_bins) (clipped to no_bins - 1) of the per-residue CA lDDT of the
    (detached) prediction against the truth (`pipeline.metrics.lddt_ca`: pairs of observed true CAs
    within R0 = `cutoff` Å, thresholds 0.5/1/2/4 Å); a residue with no observed true CA within `cutoff`
    scores 1 (top bin), as in AF2 / openfold (their lDDT is eps·(1 + sum)/(eps + n_pairs)), not the 0 of
    `lddt_ca` (a metric, where such a residue has no score); loss = cross-entropy of the logits.

    Args:
        lddt_logits_ca: (B, L, no_bins) -- ESMFold `lddt_head[-1][..., 1, :]`.
        pred_ca, true_ca: (B, L, 3) Å; ca_mask: (B, L) true CA observed.
        example_weight: optional (B,) 0/1, e.g. openfold trains pLDDT only on 0.1–3 Å resolution chains.
    Returns: scalar, nats, averaged over residues with an observed CA, then over the batch.
    """
    true_ca, ca_mask = true_ca.float(), ca_mask.float()
    score = lddt_ca(pred_ca.detach().float(), true_ca, ca_mask, per_residue=True, cutoff=cutoff)
    # Observed true CAs within `cutoff` (<=, as lddt_ca counts pairs), other than the residue itself.
    close = (torch.cdist(true_ca, true_ca) <= cutoff) & (ca_mask[..., :, None] * ca_mask[..., None, :] > 0)
    lonely = close.sum(-1) <= 1  # only itself (or unobserved: masked out of the loss anyway)
    score = torch.where(lonely, torch.ones_like(score), score)
    target = torch.clamp(torch.floor(score * no_bins).long(), max=no_bins - 1)
    errors = F.cross_entropy(lddt_logits_ca.movedim(-1, 1).float(), target, reduction="none")  # (B, L)
    per_example = _masked_mean(errors, ca_mask.float(), dims=(-1,))
    if example_weight is not None:
        per_example = per_example * example_weight.float()
    return per_example.mean()


@fp32_loss
def chi_loss(
    pred_angles: torch.Tensor,
    pred_unnormalized_angles: torch.Tensor,
    aatype: torch.Tensor,
    seq_mask: torch.Tensor,
    chi_mask: torch.Tensor,
    chi_angles_sin_cos: torch.Tensor,
    chi_weight: float = 0.5,
    angle_norm_weight: float = 0.01,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Side-chain torsion loss, AF2 Alg. 27 torsionAngleLoss (chi part, as in openfold's supervised_chi_loss).

    `chi_weight · mean |(sin, cos)_pred - (sin, cos)_true|^2` over layers and observed chis, where for
    π-periodic chis (ASP chi2, GLU chi3, PHE/TYR chi2) the true angle may also be shifted by π (the
    smaller error counts), plus `angle_norm_weight · mean | |unnormalized (sin, cos)| - 1 |` over layers,
    the 7 torsions and real residues.

    Args:
        pred_angles, pred_unnormalized_angles: (n_sm, B, L, 7, 2) or (B, L, 7, 2) ESMFold `angles`,
            `unnormalized_angles` (torsion order pre-omega, phi, psi, chi1..4).
        aatype: (B, L); seq_mask: (B, L); chi_mask: (B, L, 4); chi_angles_sin_cos: (B, L, 4, 2).
    Returns: scalar, dimensionless (squared chord length on the unit circle). At the truth: ≈ eps/2 · angle_norm_weight.
    """
    if pred_angles.dim() == 4:
        pred_angles, pred_unnormalized_angles = pred_angles[None], pred_unnormalized_angles[None]
    pred_angles, pred_unnormalized_angles = pred_angles.float(), pred_unnormalized_angles.float()
    dtype = torch.float32
    pred_chi = pred_angles[..., 3:, :]  # (n_sm, B, L, 4, 2)
    pi_periodic = pred_chi.new_tensor(rc.chi_pi_periodic)[aatype.clamp(max=rc.restype_num)]  # (B, L, 4)
    true_chi = chi_angles_sin_cos.to(dtype)
    shifted_chi = true_chi * (1.0 - 2.0 * pi_periodic)[..., None]
    error = torch.minimum(
        torch.sum((pred_chi - true_chi) ** 2, dim=-1), torch.sum((pred_chi - shifted_chi) ** 2, dim=-1)
    )  # (n_sm, B, L, 4)
    n_sm = pred_chi.shape[0]
    per_example = chi_weight * _masked_mean(error.movedim(0, 1), chi_mask.to(dtype)[:, None].expand(-1, n_sm, -1, -1), dims=(1, 2, 3))
    norm = torch.sqrt(torch.sum(pred_unnormalized_angles**2, dim=-1) + eps)  # (n_sm, B, L, 7)
    norm_error = (norm - 1.0).abs().movedim(0, 1)
    norm_mask = seq_mask.to(dtype)[:, None, :, None].expand_as(norm_error)
    per_example = per_example + angle_norm_weight * _masked_mean(norm_error, norm_mask, dims=(1, 2, 3))
    return per_example.mean()


def _output(outputs: Any, key: str) -> torch.Tensor:
    value = outputs.get(key) if isinstance(outputs, Mapping) else getattr(outputs, key, None)
    if value is None:
        raise ValueError(f"outputs: missing field {key!r} (expected EsmForProteinFoldingOutput fields)")
    return value


def _resolve_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    resolved = dict(DEFAULT_WEIGHTS)
    for key, value in (weights or {}).items():
        if key not in DEFAULT_WEIGHTS:
            raise ValueError(f"weights: unknown loss term {key!r} (known: {', '.join(DEFAULT_WEIGHTS)})")
        resolved[key] = float(value)
    return resolved


@fp32_loss
def folding_loss(
    outputs: Any,
    batch: Mapping[str, Any],
    weights: Mapping[str, float] | None = None,
    fape_clamp_distance: float | None = 10.0,
    plddt_resolution_range: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the structure losses on one ESMFold forward.

    Args:
        outputs: `EsmForProteinFoldingOutput` or a dict with frames, sidechain_frames, positions, angles,
            unnormalized_angles, distogram_logits, lddt_head.
        batch: training batch (docs/design.md): aatype (B, L), mask (B, L), atom37_positions (B, L, 37, 3),
            atom37_mask (B, L, 37); optional resolution (B,) used with `plddt_resolution_range`.
        weights: overrides of DEFAULT_WEIGHTS (fape_bb 0.5, fape_sc 0.5, distogram 0.3, plddt 0.01, chi 1.0);
            a term with weight 0 is not computed. Unknown keys raise ValueError.
        fape_clamp_distance: Å, or None for unclamped FAPE (openfold clamps 90 % of batches).
        plddt_resolution_range: (min, max) Å: only chains in it train the pLDDT head (openfold: (0.1, 3.0)).
    Returns: (total, terms) -- total is differentiable; terms holds each unweighted loss, detached.
    """
    resolved = _resolve_weights(weights)
    for field in ("aatype", "mask", "atom37_positions", "atom37_mask"):
        if field not in batch:
            raise ValueError(f"batch: missing field {field!r}")
    truth = make_ground_truth(batch["aatype"], batch["atom37_positions"].float(), batch["atom37_mask"].float(),
                              residue_mask=batch["mask"].float())
    positions = _output(outputs, "positions")
    terms: dict[str, torch.Tensor] = {}
    if resolved["fape_bb"]:
        terms["fape_bb"] = backbone_fape(
            _output(outputs, "frames"), truth["backbone_frames"], truth["backbone_rigid_mask"],
            clamp_distance=fape_clamp_distance,
        )
    if resolved["fape_sc"]:
        terms["fape_sc"] = sidechain_fape(
            _output(outputs, "sidechain_frames"), positions, truth, clamp_distance=fape_clamp_distance
        )
    if resolved["distogram"]:
        terms["distogram"] = distogram_loss(
            _output(outputs, "distogram_logits"), truth["pseudo_beta"], truth["pseudo_beta_mask"]
        )
    if resolved["plddt"]:
        weight = None
        if plddt_resolution_range is not None:
            if "resolution" not in batch:
                raise ValueError("batch: no 'resolution' field for the pLDDT resolution filter (loss.plddt_resolution)")
            resolution = torch.as_tensor(batch["resolution"], dtype=torch.float32, device=positions.device)
            low, high = plddt_resolution_range
            weight = ((resolution >= low) & (resolution <= high)).float()  # NaN (unknown) -> excluded
        ca_mask = batch["atom37_mask"][..., _CA].float() * batch["mask"].float()
        terms["plddt"] = plddt_loss(
            _output(outputs, "lddt_head")[-1][..., _CA, :], positions[-1][..., _CA, :],
            batch["atom37_positions"][..., _CA, :].float(), ca_mask, example_weight=weight,
        )
    if resolved["chi"]:
        terms["chi"] = chi_loss(
            _output(outputs, "angles"), _output(outputs, "unnormalized_angles"), batch["aatype"],
            truth["seq_mask"], truth["chi_mask"], truth["chi_angles_sin_cos"],
        )
    if not terms:
        raise ValueError("weights: every loss weight is 0")
    total = sum(resolved[name] * value for name, value in terms.items())
    return total, {name: value.detach() for name, value in terms.items()}
