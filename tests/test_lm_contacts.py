"""ESM-2 masked-LM path: BERT masking, contact precision on hand-built cases, and a short LM run."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from esm.data import Alphabet
from esm.model.esm2 import ESM2
from transformers.models.esm.openfold_utils import residue_constants as rc

from data.structure import read_chain
from data.tokenize import esm_tokens
from pipeline.cli import main
from pipeline.config import resolve
from pipeline.lm import (
    PRECISION_COLUMNS,
    build_language_model,
    contact_map,
    contact_precision,
    load_lm_run,
    mask_tokens,
)
from pipeline.train import train
from tests._esm_fixtures import random_esm2, write_esm2_checkpoint
from tests._train_helpers import STRUCTURES, make_dataset


def test_contact_precision_hand_built():
    length = 30
    contacts = np.zeros((length, length), bool)
    for i, j in [(0, 29), (1, 28), (2, 27), (0, 5)]:  # (0, 5) is short-range: never counted
        contacts[i, j] = contacts[j, i] = True
    probs = np.zeros((length, length))
    # ranking of long-range pairs (|i-j| >= 24): (0,29) hit, (3,27) miss, (1,28) hit, then the rest
    probs[0, 29], probs[3, 27], probs[1, 28] = 0.9, 0.8, 0.7
    probs[0, 5] = 1.0  # short-range, ignored
    result = contact_precision(probs, contacts)
    # 21 pairs have |i-j| >= 24; top L/5 = 6: hits (0,29), (1,28) and, at prob 0 in (i, j) order,
    # (0,24),(0,25),(0,26),(0,27) -> 2/6; top L/2 = 15: 3 hits incl. (2,27); top L = 30 but only 21 pairs:
    # the 9 missing ones are misses (fair-esm's evaluation pads them), 3/30
    assert result["P@L/5"] == pytest.approx(2 / 6)
    assert result["P@L/2"] == pytest.approx(3 / 15)
    assert result["P@L"] == pytest.approx(3 / 30)
    # a missing residue removes its pairs from the ranking
    present = np.ones(length, bool)
    present[3] = False
    assert contact_precision(probs, contacts, present, fractions=(1 / 15,))["P@L/15"] == 1.0
    assert math.isnan(contact_precision(np.zeros((10, 10)), np.zeros((10, 10), bool))["P@L"])


def test_native_contacts_use_cb_and_ca_for_glycine():
    chain = read_chain(STRUCTURES / "1l2y.pdb")
    contacts, present = contact_map(chain)
    assert present.all() and contacts.shape == (20, 20) and (contacts == contacts.T).all()
    i, j = 0, 10
    ca, cb = rc.atom_order["CA"], rc.atom_order["CB"]
    atom_i = ca if chain.sequence[i] == "G" else cb
    atom_j = ca if chain.sequence[j] == "G" else cb
    d = np.linalg.norm(chain.atom37_positions[i, atom_i] - chain.atom37_positions[j, atom_j])
    assert contacts[i, j] == (d < 8.0)
    glycine = chain.sequence.index("G")
    assert chain.atom37_mask[glycine, cb] == 0  # glycine has no CB: CA is used, so it still has contacts
    assert contacts[glycine].sum() > 1


def test_bert_masking_statistics():
    abc = Alphabet.from_architecture("ESM-1b")
    _, _, tokens = abc.get_batch_converter()([("a", "ACDEFGHIKLMNPQRSTVWY" * 50), ("b", "MK")])
    masked, targets = mask_tokens(tokens, torch.Generator().manual_seed(0))
    selected = targets != -100
    assert not selected[:, 0].any() and not (selected & (tokens == abc.padding_idx)).any()
    assert selected[1].sum() >= 1  # short rows still get a target
    rate = selected[0].float().sum() / 1000
    assert 0.12 < rate < 0.18
    replaced = (masked[0] == abc.mask_idx)[selected[0]].float().mean()
    assert 0.7 < replaced < 0.9
    assert torch.equal(targets[selected], tokens[selected])


def test_language_model_from_local_checkpoint(tmp_path):
    torch.manual_seed(1)
    ref = ESM2(num_layers=2, embed_dim=32, attention_heads=4, alphabet=Alphabet.from_architecture("ESM-1b"))
    torch.save({"model": {f"encoder.{k}": v for k, v in ref.state_dict().items()},
                "cfg": {"model": {"encoder_layers": 2, "encoder_embed_dim": 32, "encoder_attention_heads": 4,
                                  "token_dropout": True}}}, tmp_path / "lm.pt")
    model = build_language_model({"source": "random", "esm2": str(tmp_path / "lm.pt")})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def _lm_config(tmp_path, model: dict, steps: int) -> dict:
    ds, splits = make_dataset(tmp_path / "ds", [("1l2y.pdb", "train+val+test"), ("1vii.pdb", "train+val+test")])
    return resolve({"kind": "lm", "model": model,
                    "adapter": {"method": "lora", "rank": 4, "alpha": 8, "part": "stem"},
                    "data": {"dataset": str(ds), "splits": str(splits), "crop_size": None, "batch_size": 2},
                    "trainer": {"max_steps": steps, "lr": 2e-2, "warmup_steps": 0, "schedule": "constant",
                                "val_every_n_steps": steps, "threads": 2},
                    "output_dir": str(tmp_path / "run")})


def test_lm_training_run_lowers_loss_and_reports_contacts(tmp_path):
    checkpoint = write_esm2_checkpoint(tmp_path / "esm", random_esm2(perturb=False))
    cfg = _lm_config(tmp_path, {"esm2": str(checkpoint)}, steps=30)
    result = train(cfg)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    first, last = metrics["train_loss"].iloc[:5].mean(), metrics["train_loss"].iloc[-5:].mean()
    assert last < 0.8 * first  # 2 sequences are memorised quickly
    assert {"val_perplexity", "val_contact_p_at_l"} <= set(metrics.columns)
    val = metrics.dropna(subset=["val_perplexity"]).iloc[-1]
    assert val["val_perplexity"] == pytest.approx(math.exp(val["val_nll"]), rel=1e-5)
    assert 0.0 <= val["val_contact_p_at_l"] <= 1.0 and 0.0 <= val["val_contact_p_at_l5"] <= 1.0
    assert result.summary["kind"] == "lm" and result.summary["steps"] == 30
    # the run's adapter changes the contacts `foldtune contacts --run` scores
    out = tmp_path / "contacts.csv"
    assert main(["contacts", "--run", str(tmp_path / "run"), "--dataset", cfg["data"]["dataset"],
                 "--splits", cfg["data"]["splits"], "--split", "test", "--out", str(out), "--no-progress"]) == 0
    table = pd.read_csv(out)
    assert list(table.columns[:4]) == ["chain_id", "length", "observed", "long_contacts"]
    assert list(table.columns[4:]) == PRECISION_COLUMNS and len(table) == 2
    tuned, _ = load_lm_run(tmp_path / "run")
    base = build_language_model({"esm2": str(checkpoint)}).eval()
    tokens = esm_tokens(["ACDEFGHIKLMNPQRSTVWY"])
    with torch.no_grad():
        assert not torch.allclose(tuned.predict_contacts(tokens), base.predict_contacts(tokens))
    assert json.loads(out.with_suffix(".json").read_text())["method"] == "lora"


@pytest.mark.parametrize("source", ["random", "checkpoint without its regression file"])
def test_lm_without_contact_regression_reports_no_contacts(tmp_path, capsys, source):
    model = {"source": "random"}
    if source != "random":
        model = {"esm2": str(write_esm2_checkpoint(tmp_path / "esm", random_esm2(perturb=False), regression=False))}
    cfg = _lm_config(tmp_path, model, steps=2)
    train(cfg)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert "val_perplexity" in metrics.columns and "val_contact_p_at_l" not in metrics.columns
    capsys.readouterr()
    out = tmp_path / "contacts.csv"
    assert main(["contacts", "--run", str(tmp_path / "run"), "--dataset", cfg["data"]["dataset"],
                 "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no contact regression" in err and not out.exists()
