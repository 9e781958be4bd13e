"""ESM-2 masked language model (fair-esm `ESM2`): building, BERT masking, perplexity and contact precision.

"Adapt a protein LM cheaply": fine-tune ESM-2 with an adapter on the dataset's sequences (`kind: lm`),
then judge it by masked-LM perplexity and by the precision of its unsupervised contact head
(`return_contacts=True`) against contacts of the native structures.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from esm.data import Alphabet
from esm.model.esm2 import ESM2
from transformers.models.esm.openfold_utils import residue_constants as rc

from data.structure import ProteinChain

MASK_PROB = 0.15           # BERT: 15 % of residues are selected ...
MASK_REPLACE = (0.8, 0.1)  # ... of which 80 % -> <mask>, 10 % -> random residue, 10 % unchanged
CONTACT_CUTOFF = 8.0       # Å between Cβ atoms (CA for glycine)
LONG_RANGE = 24            # |i - j| >= 24

TINY_LM = {"num_layers": 2, "embed_dim": 32, "attention_heads": 4}


def alphabet() -> Alphabet:
    return Alphabet.from_architecture("ESM-1b")


def build_language_model(model_cfg: dict) -> ESM2:
    """fair-esm ESM2 from `model.esm2` (release name or local .pt), or a tiny random one (`source: random`).

    `model.size` may override num_layers / embed_dim / attention_heads of the random model. The release's
    contact regression (`<name>-contact-regression.pt`) is loaded when found; `has_contact_regression`
    on the returned model says whether it was (without it the contact head is random: see
    `require_contact_regression`).
    """
    from pipeline.models import has_contact_regression, read_fair_esm_checkpoint

    source = model_cfg.get("esm2")
    if model_cfg.get("source", "random") == "random" and not source:
        size = {**TINY_LM, **(model_cfg.get("size") or {})}
        unknown = set(size) - set(TINY_LM)
        if unknown:
            raise ValueError(f"model.size.{sorted(unknown)[0]}: unknown for kind lm ({', '.join(TINY_LM)})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random LM weights are a function of the config alone
            model = ESM2(alphabet=alphabet(), token_dropout=True, **size)
        model.has_contact_regression = False
        return model
    if not source:
        raise ValueError("model.esm2: kind lm needs a fair-esm name or a local .pt (or model.source: random)")
    on_meta = torch.empty(0).device.type == "meta"
    state, (layers, dim, heads), token_dropout = read_fair_esm_checkpoint(source, weights=not on_meta)
    model = ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet=alphabet(),
                 token_dropout=token_dropout)
    model.has_contact_regression = has_contact_regression(state)
    if not on_meta:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if not model.has_contact_regression:
            missing = [k for k in missing if not k.startswith("contact_head.")]
        if missing or unexpected:
            raise ValueError(f"model.esm2: {source}: does not fit ESM2{(layers, dim, heads)}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


class NoContactRegression(ValueError):
    """Contacts were asked of a model whose contact head is not the release's trained regression."""


def require_contact_regression(model: torch.nn.Module, what: str) -> None:
    """Raise NoContactRegression (one line naming `what`) unless `model` carries the trained contact head."""
    if not getattr(model, "has_contact_regression", False):
        raise NoContactRegression(
            f"{what}: no contact regression weights (fair-esm's <name>-contact-regression.pt next to the "
            "checkpoint); its contact head would be random, so contact precision is not reported")


def mask_tokens(tokens: torch.Tensor, generator: torch.Generator,
                mask_prob: float = MASK_PROB) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ESM tokens `(B, T)`; returns (masked tokens, targets with -100 where not selected).

    Only residue tokens (not cls/eos/pad) can be selected; at least one per row is.
    """
    abc = alphabet()
    special = torch.tensor([abc.cls_idx, abc.eos_idx, abc.padding_idx], device=tokens.device)
    residue = ~torch.isin(tokens, special)
    draw = torch.rand(tokens.shape, generator=generator).to(tokens.device)
    selected = (draw < mask_prob) & residue
    # Guarantee one target per row so the loss is defined for short sequences.
    first = residue.float().argmax(dim=1)
    none = ~selected.any(dim=1)
    selected[none, first[none]] = True
    action = torch.rand(tokens.shape, generator=generator).to(tokens.device)
    standard = torch.tensor([abc.get_idx(a) for a in rc.restypes], device=tokens.device)
    random_res = standard[torch.randint(len(standard), tokens.shape, generator=generator).to(tokens.device)]
    masked = tokens.clone()
    masked[selected & (action < MASK_REPLACE[0])] = abc.mask_idx
    swap = selected & (action >= MASK_REPLACE[0]) & (action < MASK_REPLACE[0] + MASK_REPLACE[1])
    masked[swap] = random_res[swap]
    targets = tokens.masked_fill(~selected, -100)
    return masked, targets


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy (nats) over selected positions; logits (B, T, V), targets (B, T) with -100 = ignore."""
    count = int((targets != -100).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
    return loss, count


def perplexity(mean_nll: float) -> float:
    return float(math.exp(mean_nll))


def contact_map(chain: ProteinChain, cutoff: float = CONTACT_CUTOFF) -> tuple[np.ndarray, np.ndarray]:
    """Native contacts: (L, L) bool (Cβ–Cβ < cutoff Å, CA for glycine) and (L,) bool of residues with that atom."""
    cb, ca = rc.atom_order["CB"], rc.atom_order["CA"]
    glycine = chain.aatype == rc.restype_order["G"]
    atom = np.where(glycine, ca, cb)
    rows = np.arange(len(chain.aatype))
    xyz = chain.atom37_positions[rows, atom]
    present = chain.atom37_mask[rows, atom] > 0.5
    dist = np.linalg.norm(xyz[:, None, :] - xyz[None, :, :], axis=-1)
    contacts = (dist < cutoff) & present[:, None] & present[None, :]
    return contacts, present


def contact_precision(probs: np.ndarray | torch.Tensor, contacts: np.ndarray, present: np.ndarray | None = None,
                      min_separation: int = LONG_RANGE, fractions: tuple[float, ...] = (1.0, 0.5, 0.2)
                      ) -> dict[str, float]:
    """Top-L/k precision of predicted contacts at sequence separation >= `min_separation`.

    probs: (L, L) predicted contact probabilities; contacts: (L, L) bool native contacts; present: (L,) bool,
    residues with a native Cβ/CA (pairs with a missing residue are not ranked). For each fraction f the
    floor(f·L) (at least 1) highest-ranked pairs i < j are taken (ties keep (i, j) order) and the fraction
    of them that are native contacts is returned as `P@L`, `P@L/2`, `P@L/5`; when fewer pairs qualify,
    the mean is over those. NaN when none does.
    """
    probs = probs.detach().float().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, float)
    length = probs.shape[0]
    if present is None:
        present = np.ones(length, bool)
    i, j = np.triu_indices(length, k=min_separation)
    keep = present[i] & present[j]
    i, j = i[keep], j[keep]
    order = np.argsort(-probs[i, j], kind="stable")
    hits = contacts[i[order], j[order]]
    out = {}
    for fraction in fractions:
        name = "P@L" if fraction == 1.0 else f"P@L/{round(1 / fraction)}"
        k = max(1, int(length * fraction))
        out[name] = float(hits[:k].mean()) if len(hits) else float("nan")
    return out
