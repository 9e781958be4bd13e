"""fair-esm is the oracle: tiny ESM-2 checkpoints in the released on-disk layout (tests/_esm_fixtures.py),
loaded by fair-esm itself and by our two loaders (`kind: lm` and the ESMFold stem `source: esm2_stem`)."""

from __future__ import annotations

import pytest
import torch
from esm.data import Alphabet

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
