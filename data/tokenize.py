"""Sequence -> token ids. One function per vocabulary; both are tested against the libraries' own encoders.

- ``esm_tokens``: the fair-esm ESM-1b/ESM-2 alphabet (``<cls>`` 0, ``<pad>`` 1, ``<eos>`` 2, ``<unk>`` 3,
  ``<mask>`` 32) with cls prepended and eos appended, padded with 1 — the input of ESM-2 language models.
- ``af2_indices``: AlphaFold2 residue order ``ARNDCQEGHILKMFPSTWYV`` with X = 20 — the ``input_ids`` of
  ``EsmForProteinFolding`` (what ``EsmForProteinFolding.infer`` builds with ``residue_constants``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

from data import residue_constants as rc


@functools.lru_cache(maxsize=1)
def esm_alphabet():
    """The fair-esm alphabet shared by ESM-1b and ESM-2 (``esm.Alphabet.from_architecture("ESM-1b")``)."""
    import esm

    return esm.Alphabet.from_architecture("ESM-1b")


@functools.lru_cache(maxsize=1)
def _esm_vocab() -> tuple[dict[str, int], int, int, int, int]:
    alphabet = esm_alphabet()
    return dict(alphabet.tok_to_idx), alphabet.unk_idx, alphabet.cls_idx, alphabet.eos_idx, alphabet.padding_idx


ESM_PAD, ESM_MASK = 1, 32  # fixed by the alphabet; asserted in tests


def esm_tokens(seqs: Sequence[str]) -> "torch.Tensor":
    """(B, Lmax + 2) long: ``<cls> seq <eos>`` per row, right-padded with ``<pad>`` (1).

    Letters outside the alphabet become ``<unk>`` (3); lower case is upper-cased.
    """
    import torch

    vocab, unk, cls, eos, pad = _esm_vocab()
    width = max((len(s) for s in seqs), default=0) + 2
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids = [vocab.get(letter, unk) for letter in seq.upper()]
        tokens[row, 0] = cls
        tokens[row, 1 : len(ids) + 1] = torch.tensor(ids, dtype=torch.long)
        tokens[row, len(ids) + 1] = eos
    return tokens


_AF2_ORDER: dict[str, int] = dict(rc.restype_order_with_x)  # A..V -> 0..19, X -> 20
_AF2_UNKNOWN = rc.restype_order_with_x["X"]


def af2_indices(seq: str) -> "torch.Tensor":
    """(L,) long in AlphaFold2 order (``residue_constants.restypes``); anything else (B, Z, U, O, X) -> 20."""
    import torch

    return torch.tensor([_AF2_ORDER.get(letter, _AF2_UNKNOWN) for letter in seq.upper()], dtype=torch.long)


def af2_sequence(aatype) -> str:
    """Inverse of ``af2_indices`` (20 -> X)."""
    return "".join(rc.restypes_with_x[int(i)] for i in aatype)
