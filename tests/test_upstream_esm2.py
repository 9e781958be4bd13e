"""fair-esm is the oracle: tiny ESM-2 checkpoints in the released on-disk layout (tests/_esm_fixtures.py),
loaded by fair-esm itself and by our two loaders (`kind: lm` and the ESMFold stem `source: esm2_stem`)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from esm.data import Alphabet
from transformers.models.esm.openfold_utils import residue_constants as rc

from pipeline.lm import NoContactRegression, build_language_model, require_contact_regression
from pipeline.models import build_folding_model
from tests._esm_fixtures import load_with_fair_esm, random_esm2, write_esm2_checkpoint

SEQUENCES = [("a", "MKTAYIAKQRQISFVKSHFSRQLEERLG"), ("b", "GSHM<mask>LEKV"), ("c", "ACDEFGHIKLMNPQRSTVWY")]
STEM_HEAD = {"trunk.sequence_state_dim": 64, "trunk.pairwise_state_dim": 32, "trunk.sequence_head_width": 16,
             "trunk.pairwise_head_width": 16, "trunk.structure_module.sequence_dim": 32,
             "trunk.structure_module.pairwise_dim": 32}
TOL = 1e-5


@pytest.fixture(scope="module", params=["zip", "legacy"])
def checkpoint(request, tmp_path_factory):
    """(path of the main .pt, the fair-esm model it was written from)."""
    model = random_esm2(layers=3, embed_dim=32, heads=4, seed=7)
    path = write_esm2_checkpoint(tmp_path_factory.mktemp(request.param), model, zipfile=request.param == "zip")
    return path, model


def _tokens() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Batch-converted tokens (B, T) with cls/eos/padding, the real-token mask (B, T), residue counts."""
    abc = Alphabet.from_architecture("ESM-1b")
    _, strings, tokens = abc.get_batch_converter()(SEQUENCES)
    lengths = [int(((row != abc.padding_idx) & (row != abc.cls_idx) & (row != abc.eos_idx)).sum()) for row in tokens]
    return tokens, tokens != abc.padding_idx, lengths


def _max_diff(a: torch.Tensor, b: torch.Tensor, real: torch.Tensor | None = None) -> float:
    diff = (a.detach().float() - b.detach().float()).abs()
    if real is not None:
        diff = diff * real
    return float(diff.max())


def test_fixture_is_read_by_fair_esm_itself(checkpoint):
    """The fixture is in the released layout only if fair-esm's own local loader (main file + co-located
    `-contact-regression.pt`, strict state-dict load) reproduces the model it was written from."""
    path, written = checkpoint
    loaded = load_with_fair_esm(path)
    assert set(loaded.state_dict()) == set(written.state_dict())
    for name, tensor in written.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    data = torch.load(path, map_location="cpu", weights_only=False)
    assert "contact_head.regression.weight" not in str(list(data["model"]))  # separate file, as released
    assert any(k.startswith("encoder.sentence_encoder.layers.0.") for k in data["model"])
    assert any(k.startswith("encoder.lm_head.") for k in data["model"])
    assert data["cfg"]["model"].encoder_layers == 3  # attribute-style args


def test_lm_loader_equals_fair_esm(checkpoint):
    path, _ = checkpoint
    fair = load_with_fair_esm(path)
    ours = build_language_model({"esm2": str(path)}).eval()
    assert ours.has_contact_regression
    tokens, real, _ = _tokens()
    with torch.no_grad():
        ref = fair(tokens, repr_layers=[0, 1, 2, 3], return_contacts=True)
        got = ours(tokens, repr_layers=[0, 1, 2, 3], return_contacts=True)
    assert _max_diff(got["logits"], ref["logits"], real[..., None]) <= TOL
    for layer in range(4):
        assert _max_diff(got["representations"][layer], ref["representations"][layer], real[..., None]) <= TOL
    assert _max_diff(got["contacts"], ref["contacts"]) <= TOL
    assert _max_diff(ours.predict_contacts(tokens), fair.predict_contacts(tokens)) <= TOL


def test_esm2_stem_equals_fair_esm(checkpoint):
    """Hidden states (eval and train mode: ESM-2 has no dropout), the folding model's stacked LM features
    and the HF contact head (the release's regression) against fair-esm's model from the same files."""
    path, _ = checkpoint
    fair = load_with_fair_esm(path)
    model = build_folding_model({"source": "esm2_stem", "esm2": str(path), "num_blocks": 0, "size": STEM_HEAD})
    tokens, real, lengths = _tokens()
    with torch.no_grad():
        ref = fair(tokens, repr_layers=[0, 1, 2, 3], return_contacts=True)
        for mode in ("eval", "train"):
            model.train(mode == "train")
            hidden = model.esm(tokens, attention_mask=real.long(), output_hidden_states=True).hidden_states
            for layer in range(4):
                diff = _max_diff(hidden[layer], ref["representations"][layer], real[..., None])
                assert diff <= TOL, f"{mode} layer {layer}: {diff}"
        model.eval()
        contacts = model.esm.predict_contacts(tokens, attention_mask=real.long())
        # the folding model's own path: ESM ids without cls/eos, padded with 1, features (B, L, layers + 1, C)
        esmaa = tokens[:, 1:-1].clone()
        esmaa[esmaa == 2] = 1
        features = model.language_model_features(esmaa)
    for row, length in enumerate(lengths):
        assert _max_diff(contacts[row, :length, :length], ref["contacts"][row, :length, :length]) <= TOL
        stacked = torch.stack([ref["representations"][k][row, 1:length + 1] for k in range(4)], dim=1)
        assert _max_diff(features[row, :length], stacked) <= TOL


def test_missing_regression_file_refuses_contacts(tmp_path):
    path = write_esm2_checkpoint(tmp_path, random_esm2(seed=1), regression=False)
    model = build_language_model({"esm2": str(path)})
    assert not model.has_contact_regression
    with pytest.raises(NoContactRegression, match=r"^model.esm2: .*contact-regression\.pt.*not reported$"):
        require_contact_regression(model, "model.esm2: " + str(path))
    assert not build_language_model({"source": "random"}).has_contact_regression  # random head: refused too
    with_file = write_esm2_checkpoint(tmp_path / "with", random_esm2(seed=1))
    require_contact_regression(build_language_model({"esm2": str(with_file)}), "model.esm2")  # no error


def test_stem_of_a_pretrained_directory_is_frozen(tmp_path):
    """transformers' from_pretrained makes every weight trainable again; the stem must stay frozen."""
    build_folding_model({"source": "random"}).save_pretrained(tmp_path / "esmfold")
    model = build_folding_model({"source": "esmfold_pretrained", "path": str(tmp_path / "esmfold")})
    trainable = [name for name, p in model.esm.named_parameters() if p.requires_grad]
    assert not trainable and not model.stem_trainable


# ------------------------------------------------------------------------------- contact precision oracle

def _hand_precision(probs: np.ndarray, chain, low: int, high: int | None, fraction: float) -> float:
    """Top-k precision written out pair by pair: Cβ (CA for Gly) < 8 Å, separation along the deposited
    sequence, pairs with an unobserved residue (or one without its atom) left out, k = floor(f N), misses
    for missing pairs."""
    n = len(chain.sequence)
    atoms = []
    for pos in range(n):
        name = "CA" if chain.sequence[pos] == "G" else "CB"
        index = rc.atom_order[name]
        ok = bool(chain.observed[pos]) and chain.atom37_mask[pos, index] > 0.5
        atoms.append(chain.atom37_positions[pos, index] if ok else None)
    pairs = []
    for a in range(n):
        for b in range(a + 1, n):
            sep = abs(int(chain.residue_index[b]) - int(chain.residue_index[a]))
            if sep < low or (high is not None and sep > high) or atoms[a] is None or atoms[b] is None:
                continue
            contact = float(np.sqrt(((atoms[a] - atoms[b]) ** 2).sum())) < 8.0
            pairs.append((-float(probs[a, b]), a, b, contact))
    if not pairs:
        return float("nan")
    pairs.sort(key=lambda p: (p[0], p[1], p[2]))
    k = max(1, int(n * fraction))
    return sum(p[3] for p in pairs[:k]) / k


def test_contact_precision_equals_a_hand_computation_from_fair_esm(tmp_path):
    """`foldtune contacts` on a gapped chain (1bhl: a 16-residue internal gap) and a chain with missing
    termini (1orc) equals the hand computation from fair-esm's own `predict_contacts` on the fixture."""
    from data.chains import chain_path, load_chain
    from pipeline.cli import main
    from tests._train_helpers import make_dataset

    path = write_esm2_checkpoint(tmp_path / "esm", random_esm2(layers=2, embed_dim=32, heads=4, seed=3))
    dataset, splits = make_dataset(tmp_path / "ds", [("1bhl.pdb", "test"), ("1orc.pdb", "test"),
                                                     ("1l2y.pdb", "train")])
    out = tmp_path / "contacts" / "test.csv"
    assert main(["contacts", "--esm2", str(path), "--dataset", str(dataset), "--splits", str(splits),
                 "--split", "test", "--out", str(out), "--no-progress"]) == 0
    table = pd.read_csv(out).set_index("chain_id")
    assert sorted(table.index) == ["1bhl_A", "1orc_A"]
    summary = json.loads(out.with_suffix(".json").read_text())
    fair = load_with_fair_esm(path)
    ranges = {"short": (6, 11), "medium": (12, 23), "long": (24, None)}
    fractions = {"P@L": 1.0, "P@L/2": 0.5, "P@L/5": 0.2}
    naive_differs = False
    for chain_id in table.index:
        chain = load_chain(chain_path(dataset, chain_id))
        assert not chain.observed.all()  # the point of these chains: unobserved residues in the sequence
        tokens = Alphabet.from_architecture("ESM-1b").get_batch_converter()([(chain_id, chain.sequence)])[2]
        with torch.no_grad():
            probs = fair.predict_contacts(tokens)[0].numpy()
        for name, (low, high) in ranges.items():
            for label, fraction in fractions.items():
                want = _hand_precision(probs, chain, low, high, fraction)
                assert table.at[chain_id, f"{name}_{label}"] == pytest.approx(want, abs=1e-6), (chain_id, name, label)
                # separation counted over the observed residues only (array positions) would differ somewhere
                kept = np.flatnonzero(chain.observed)
                squeezed = dataclasses.replace(chain, residue_index=np.arange(len(kept)),
                                               sequence="".join(chain.sequence[i] for i in kept),
                                               aatype=chain.aatype[kept], observed=chain.observed[kept],
                                               atom37_positions=chain.atom37_positions[kept],
                                               atom37_mask=chain.atom37_mask[kept])
                naive = _hand_precision(probs[np.ix_(kept, kept)], squeezed, low, high, fraction)
                naive_differs |= not (naive == pytest.approx(want, abs=1e-6))
    assert naive_differs
    for column, mean in summary["mean"].items():
        assert mean == pytest.approx(table[column].mean(), abs=1e-6)
    assert summary["chains"] == 2 and summary["method"] == "none"
