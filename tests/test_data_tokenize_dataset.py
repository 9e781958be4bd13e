"""Tokenizers against the libraries' own encoders; dataset round trip, crops and token-budget batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data.dataset import (FoldingDataset, SequenceDataset, TokenBudgetBatchSampler, collate, collate_sequences,
                          load_chain, read_manifest, save_chain)
from data.prepare import ChainFilters, prepare_dataset
from data.structure import read_chain
from data.tokenize import ESM_MASK, ESM_PAD, af2_indices, af2_sequence, esm_alphabet, esm_tokens

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples" / "structures"
SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "ACDEFGHIKLMNPQRSTVWYXBZUO", "MA", "GGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGG"]


def test_esm_tokens_match_fair_esm_batch_converter():
    alphabet = esm_alphabet()
    assert (alphabet.padding_idx, alphabet.mask_idx, ESM_PAD, ESM_MASK) == (1, 32, 1, 32)
    _, _, expected = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(SEQS)])
    tokens = esm_tokens(SEQS)
    assert tokens.dtype == torch.long and tokens.shape == (4, max(map(len, SEQS)) + 2)
    assert torch.equal(tokens, expected)
    assert tokens[2, 0] == alphabet.cls_idx and tokens[2, 3] == alphabet.eos_idx and (tokens[2, 4:] == 1).all()


def test_af2_indices_match_residue_constants_onehot():
    from transformers.models.esm.openfold_utils import residue_constants as rc

    for seq in SEQS[:2] + ["XXXX"]:
        clean = "".join(c if c in rc.restypes else "X" for c in seq)
        expected = rc.sequence_to_onehot(clean, rc.restype_order_with_x, map_unknown_to_x=True).argmax(-1)
        assert af2_indices(seq).tolist() == expected.tolist()
    assert af2_indices("ARNDCQEGHILKMFPSTWYVX").tolist() == list(range(21))
    assert af2_sequence(af2_indices("MKBX")) == "MKXX"


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dataset")
    files = [SAMPLES / name for name in ("1a8o.pdb", "1ubi.pdb", "1vii.pdb", "2ofg.cif", "1orc.pdb", "5zng.pdb")]
    summary = prepare_dataset(files, out, ChainFilters(min_len=16), progress=False)
    assert summary.chains_written == 7 and not summary.errors
    return out


def test_npz_round_trip_keeps_every_field(dataset_dir, tmp_path):
    chain = read_chain(SAMPLES / "1orc.pdb")
    save_chain(chain, tmp_path / "c.npz")
    back = load_chain(tmp_path / "c.npz")
    for key in ("aatype", "residue_index", "observed", "author_number", "insertion_code", "atom37_positions",
                "atom37_mask", "b_factors"):
        np.testing.assert_array_equal(getattr(back, key), getattr(chain, key))
    assert (back.sequence, back.pdb_id, back.chain, back.method, back.resolution, back.release_date,
            back.sequence_source, back.sequence_note) == (
        chain.sequence, chain.pdb_id, chain.chain, chain.method, chain.resolution, chain.release_date,
        chain.sequence_source, chain.sequence_note)
    manifest = read_manifest(dataset_dir)
    assert set(manifest.chain_id) == {"1a8o_A", "1ubi_A", "1vii_A", "2ofg_X", "1orc_A", "5zng_A", "5zng_C"}
    row = manifest.set_index("chain_id").loc["1orc_A"]
    assert row.length == len(chain) == 71 and row.n_observed == chain.n_observed == 64
    assert row.sequence == chain.sequence and row.sequence_source == "seqres"
    with np.load(dataset_dir / row.npz) as npz:
        assert str(npz["sequence"]) == chain.sequence  # the design's 0-d str array


def test_crops_are_contiguous_and_deterministic(dataset_dir):
    ds = FoldingDataset(dataset_dir, crop_size=30, seed=7)
    again = FoldingDataset(dataset_dir, crop_size=30, seed=7)
    other_seed = FoldingDataset(dataset_dir, crop_size=30, seed=8)
    starts = []
    for i in range(len(ds)):
        item, chain = ds[i], ds.chain(i)
        n = min(len(chain), 30)
        assert item["aatype"].shape == (n,) and item["atom37_positions"].shape == (n, 37, 3)
        s = item["crop_start"]
        assert 0 <= s <= len(chain) - n
        assert torch.equal(item["residue_index"], torch.from_numpy(chain.residue_index[s : s + n]))
        assert torch.equal(item["atom37_positions"], torch.from_numpy(chain.atom37_positions[s : s + n]))
        assert item["sequence"] == chain.sequence[s : s + n]
        assert torch.equal(item["observed"], torch.from_numpy(chain.observed[s : s + n].astype(np.float32)))
        assert item["observed"].sum() > 0  # never a crop without coordinates
        assert again[i]["crop_start"] == s
        starts.append(s)
    assert [other_seed[i]["crop_start"] for i in range(len(ds))] != starts
    ds.set_epoch(1)
    assert [ds[i]["crop_start"] for i in range(len(ds))] != starts
    ds.set_epoch(0)
    assert [ds[i]["crop_start"] for i in range(len(ds))] == starts


def test_collate_pads_and_masks(dataset_dir):
    ds = FoldingDataset(dataset_dir, crop_size=None)
    items = [ds[i] for i in range(len(ds))]
    batch = collate(items)
    lengths = [len(ds.chain(i)) for i in range(len(ds))]
    assert batch["aatype"].shape == (len(ds), max(lengths)) and batch["aatype"].dtype == torch.long
    assert batch["atom37_positions"].shape == (len(ds), max(lengths), 37, 3)
    assert batch["mask"].sum(1).tolist() == lengths
    assert batch["chain_id"] == ds.chain_ids
    for row, n in enumerate(lengths):
        observed = torch.from_numpy(ds.chain(row).observed)
        assert batch["atom37_mask"][row, n:].sum() == 0
        assert torch.equal(batch["atom37_mask"][row, :n, 1].bool(), observed)
        assert torch.equal(batch["observed"][row, :n].bool(), observed) and batch["observed"][row, n:].sum() == 0
        assert torch.equal(batch["aatype"][row, :n], torch.from_numpy(ds.chain(row).aatype))


@pytest.mark.parametrize("max_tokens,shuffle", [(64, True), (300, True), (1000, False), (250, True)])
def test_token_budget_batches_cover_each_index_once(max_tokens, shuffle):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=101).tolist() + [200]  # one item longer than some budgets
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=max_tokens, shuffle=shuffle, seed=3)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(len(lengths)))
        for batch in batches:
            padded = len(batch) * max(lengths[i] for i in batch)
            assert padded <= max_tokens or len(batch) == 1
        assert len(sampler) == len(batches)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert (first != list(sampler)) == shuffle
    # bucketing: few batches compared to one-per-item
    assert len(first) < len(lengths) / 2 or max_tokens < 250


def test_dataloader_end_to_end_with_sampler(dataset_dir):
    ds = FoldingDataset(dataset_dir, crop_size=40, seed=0)
    sampler = TokenBudgetBatchSampler(ds.lengths, max_tokens=100, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    seen = []
    for batch in loader:
        assert batch["mask"].numel() <= 100
        seen += batch["chain_id"]
    assert sorted(seen) == sorted(ds.chain_ids)


def test_sequence_dataset_tokens(dataset_dir):
    ds = SequenceDataset(dataset_dir, crop_size=50, seed=1)
    batch = collate_sequences([ds[i] for i in range(len(ds))])
    assert batch["tokens"].shape[1] == max(map(len, batch["sequence"])) + 2
    assert torch.equal(batch["tokens"], esm_tokens(batch["sequence"]))
    assert all(len(s) <= 50 for s in batch["sequence"])
    manifest = read_manifest(dataset_dir).set_index("chain_id")
    for chain_id, seq in zip(batch["chain_id"], batch["sequence"]):
        assert seq in manifest.loc[chain_id, "sequence"]
