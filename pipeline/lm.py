"""ESM-2 masked language model (fair-esm `ESM2`): building, BERT masking, perplexity and contact precision.

"Adapt a protein LM cheaply": fine-tune ESM-2 with an adapter on the dataset's sequences (`kind: lm`),
then judge it by masked-LM perplexity and by the precision of its unsupervised contact head
(`return_contacts=True`) against contacts of the native structures.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from esm.data import Alphabet
from esm.model.esm2 import ESM2
from transformers.models.esm.openfold_utils import residue_constants as rc

from data.structure import ProteinChain

if TYPE_CHECKING:
    import pandas as pd

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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # what the checkpoint lacks (a contact head without its regression file) is
        model = ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet=alphabet(),
                     token_dropout=token_dropout)  # the same in every process, so the base fingerprint is too
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
    """Native contacts: (N, N) bool (Cβ–Cβ < cutoff Å, CA for glycine) and (N,) bool of residues with that atom.

    N positions along the chain's deposited sequence; an unobserved residue has no atom, so it is not present
    and takes part in no pair.
    """
    cb, ca = rc.atom_order["CB"], rc.atom_order["CA"]
    glycine = chain.aatype == rc.restype_order["G"]
    atom = np.where(glycine, ca, cb)
    rows = np.arange(len(chain.aatype))
    xyz = chain.atom37_positions[rows, atom]
    present = chain.atom37_mask[rows, atom] > 0.5
    if chain.observed is not None:
        present &= np.asarray(chain.observed, bool)
    dist = np.linalg.norm(xyz[:, None, :] - xyz[None, :, :], axis=-1)
    contacts = (dist < cutoff) & present[:, None] & present[None, :]
    return contacts, present


def _fraction_name(fraction: float) -> str:
    return "P@L" if fraction == 1.0 else f"P@L/{round(1 / fraction)}"


def contact_precision(probs: np.ndarray | torch.Tensor, contacts: np.ndarray, present: np.ndarray | None = None,
                      min_separation: int = LONG_RANGE, fractions: tuple[float, ...] = (1.0, 0.5, 0.2),
                      max_separation: int | None = None, residue_index: np.ndarray | None = None
                      ) -> dict[str, float]:
    """Top-L/k precision of predicted contacts with sequence separation in [min_separation, max_separation].

    probs: (N, N) predicted contact probabilities of the N positions of the deposited sequence; contacts:
    (N, N) bool native contacts; present: (N,) bool, residues with a native Cβ/CA (pairs with a missing residue
    are not ranked); residue_index: (N,) positions along the deposited sequence (default 0..N-1), from which
    the separation |i - j| is measured. For each fraction f the k = floor(f·N) (at least 1) highest-ranked
    pairs i < j are taken (ties keep (i, j) order) and the returned `P@L`, `P@L/2`, `P@L/5` is the number of
    native contacts among them divided by k; when fewer than k pairs qualify the missing ones count as misses
    (as fair-esm's contact evaluation pads them). NaN when no pair qualifies.
    """
    probs = probs.detach().float().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, float)
    length = probs.shape[0]
    if present is None:
        present = np.ones(length, bool)
    position = np.arange(length) if residue_index is None else np.asarray(residue_index, np.int64)
    i, j = np.triu_indices(length, k=1)
    separation = np.abs(position[j] - position[i])
    keep = present[i] & present[j] & (separation >= min_separation)
    if max_separation is not None:
        keep &= separation <= max_separation
    i, j = i[keep], j[keep]
    order = np.argsort(-probs[i, j], kind="stable")
    hits = contacts[i[order], j[order]]
    out = {}
    for fraction in fractions:
        k = max(1, int(length * fraction))
        out[_fraction_name(fraction)] = float(hits[:k].sum() / k) if len(hits) else float("nan")
    return out


# Sequence-separation ranges (inclusive) of the contact evaluation (CASP / ESM conventions).
RANGES: dict[str, tuple[int, int | None]] = {"short": (6, 11), "medium": (12, 23), "long": (LONG_RANGE, None)}
FRACTIONS = (1.0, 0.5, 0.2)
PRECISION_COLUMNS = [f"{name}_{_fraction_name(f)}" for name in RANGES for f in FRACTIONS]


def range_precisions(probs: np.ndarray | torch.Tensor, chain: ProteinChain,
                     cutoff: float = CONTACT_CUTOFF) -> dict[str, float]:
    """`<range>_P@L`, `_P@L/2`, `_P@L/5` for the short, medium and long ranges of one chain.

    probs: (N, N) predicted contacts over the chain's N deposited positions (its `residue_index` gives the
    separation; unobserved residues are excluded through `contact_map`).
    """
    contacts, present = contact_map(chain, cutoff)
    if probs.shape != contacts.shape:
        raise ValueError(f"{chain.pdb_id}_{chain.chain}: predicted contacts {tuple(probs.shape)} do not match the "
                         f"chain's {len(chain)} positions")
    out = {}
    for name, (low, high) in RANGES.items():
        precision = contact_precision(probs, contacts, present, min_separation=low, max_separation=high,
                                      fractions=FRACTIONS, residue_index=chain.residue_index)
        out.update({f"{name}_{key}": value for key, value in precision.items()})
    return out


def predict_chain_contacts(model: ESM2, sequences: list[str]) -> list[torch.Tensor]:
    """fair-esm contact probabilities of each sequence, (N_i, N_i) float32 on CPU (one batch, no grad)."""
    from data.tokenize import esm_tokens

    tokens = esm_tokens(sequences).to(next(model.parameters()).device)
    with torch.no_grad():
        probs = model.predict_contacts(tokens).float().cpu()
    return [probs[row, : len(seq), : len(seq)] for row, seq in enumerate(sequences)]


def read_lm_run_config(run_dir: Path) -> dict:
    """RUN/config.yaml of a `kind: lm` run (ValueError naming the file otherwise)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{path}: config: not found (is {run_dir} a foldtune run?)")
    cfg = yaml.safe_load(path.read_text()) or {}
    if cfg.get("kind", "fold") != "lm":
        raise ValueError(f"{path}: kind: {cfg.get('kind', 'fold')!r}; contact precision needs a kind lm run")
    return cfg


def load_lm_run(run_dir: str | Path) -> tuple[ESM2, dict]:
    """Rebuild a language-model run's base from RUN/config.yaml, load RUN/adapter; (model in eval mode, cfg)."""
    from pipeline.predict import load_run_adapter
    from pipeline.train import load_base_run

    run_dir = Path(run_dir)
    cfg = read_lm_run_config(run_dir)
    model = build_language_model(cfg["model"])
    has_regression = model.has_contact_regression
    if cfg["model"].get("base_run"):
        load_base_run(model, cfg["model"]["base_run"])
    load_run_adapter(model, run_dir, cfg)
    model.has_contact_regression = has_regression
    return model.eval(), cfg


def evaluate_contacts(model: ESM2, chains: dict[str, ProteinChain], max_tokens: int = 4096,
                      progress: bool = False) -> "pd.DataFrame":
    """Per-chain contact precision: chain_id, length, observed, contacts (long-range native pairs) and the
    `PRECISION_COLUMNS`; each chain's full deposited sequence is the model's input.

    Chains are batched by length within `max_tokens` (B x Lmax) tokens. Refuses a model without the
    release's contact regression (`require_contact_regression`).
    """
    import pandas as pd
    from tqdm import tqdm

    require_contact_regression(model, "model")
    ids = sorted(chains, key=lambda c: (len(chains[c]), c))
    batches: list[list[str]] = []
    for chain_id in ids:
        if batches and (len(batches[-1]) + 1) * len(chains[chain_id]) <= max_tokens:
            batches[-1].append(chain_id)
        else:
            batches.append([chain_id])
    rows = []
    for batch in tqdm(batches, desc="contacts", disable=not progress):
        for chain_id, probs in zip(batch, predict_chain_contacts(model, [chains[c].sequence for c in batch])):
            chain = chains[chain_id]
            native, present = contact_map(chain)
            separation = np.abs(chain.residue_index[:, None] - chain.residue_index[None, :])
            rows.append({"chain_id": chain_id, "length": len(chain), "observed": int(present.sum()),
                         "long_contacts": int(np.triu(native & (separation >= LONG_RANGE)).sum()),
                         **range_precisions(probs, chain)})
    table = pd.DataFrame(rows, columns=["chain_id", "length", "observed", "long_contacts", *PRECISION_COLUMNS])
    return table.sort_values("chain_id").reset_index(drop=True)


def summarize_contacts(table: "pd.DataFrame") -> dict[str, Any]:
    """Means over chains of every precision column (chains without a pair in a range are left out: NaN) and
    how many chains each mean is over."""
    means = {column: (None if table[column].isna().all() else float(table[column].mean()))
             for column in PRECISION_COLUMNS}
    counts = {column: int(table[column].notna().sum()) for column in PRECISION_COLUMNS}
    return {"chains": int(len(table)), "mean": means, "chains_with_pairs": counts}
