"""Tiny fair-esm ESM-2 checkpoints written in the layout of the released `.pt` files (random weights).

A release is two files: ``<name>.pt`` with ``cfg`` (a dict of sections; ``cfg["model"]`` an
``argparse.Namespace`` of fairseq model args, read by attribute) and ``model`` (state dict with the
``encoder.sentence_encoder.`` prefix on the transformer and ``encoder.lm_head.`` on the LM head, rotary
``inv_freq`` buffers included, no contact head), and ``<name>-contact-regression.pt`` holding
``{"model": {"contact_head.regression.weight", "contact_head.regression.bias"}}``. fair-esm's own
``esm.pretrained.load_model_and_alphabet_local`` reads that pair (tests/test_upstream_esm2.py checks it).
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import torch
from esm.data import Alphabet
from esm.model.esm2 import ESM2

# fair-esm keys the loader branches on: the name must start with "esm2" (ESM-2 loader, regression file expected).
TINY_NAME = "esm2_t2_32_tiny"


def random_esm2(layers: int = 2, embed_dim: int = 32, heads: int = 4, token_dropout: bool = True,
                seed: int = 0, perturb: bool = True) -> ESM2:
    """fair-esm ESM2 with every parameter random (layer-norm scales ~1, so a misplaced norm shows); with
    `perturb=False` fair-esm's own initialisation (trainable as usual) and a random contact regression."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ESM2(num_layers=layers, embed_dim=embed_dim, attention_heads=heads,
                     alphabet=Alphabet.from_architecture("ESM-1b"), token_dropout=token_dropout)
    with torch.no_grad():
        if not perturb:
            regression = model.contact_head.regression
            regression.weight.copy_(torch.randn(regression.weight.shape, generator=generator))
            return model.eval()
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "layer_norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.startswith("contact_head"):
                param.copy_(noise)  # logistic regression over the layer x head attention maps
            else:
                param.copy_(0.2 * noise if param.dim() > 1 else 0.05 * noise)
    return model.eval()


def model_args(layers: int, embed_dim: int, heads: int, token_dropout: bool) -> Namespace:
    """`cfg["model"]` as fairseq wrote it for ESM-2 (fields fair-esm reads, plus a few it ignores)."""
    return Namespace(_name="esm2", encoder_layers=layers, encoder_embed_dim=embed_dim,
                     encoder_ffn_embed_dim=4 * embed_dim, encoder_attention_heads=heads,
                     token_dropout=token_dropout, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     max_positions=1024, mask_prob=0.15)


def write_esm2_checkpoint(directory: str | Path, model: ESM2, name: str = TINY_NAME, zipfile: bool = True,
                          regression: bool = True) -> Path:
    """Write `model` as `<directory>/<name>.pt` (+ `<name>-contact-regression.pt`); returns the main path.

    `zipfile=False` writes torch's legacy (non-zip) serialization, as older releases were saved.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, contact = {}, {}
    for key, tensor in model.state_dict().items():
        if key.startswith("contact_head."):
            contact[key] = tensor.clone()
        elif key.startswith("lm_head."):
            state[f"encoder.{key}"] = tensor.clone()
        else:
            state[f"encoder.sentence_encoder.{key}"] = tensor.clone()
    layers, embed_dim = model.num_layers, model.embed_dim
    heads, token_dropout = model.attention_heads, model.token_dropout
    data = {"model": state, "args": None,
            "cfg": {"_name": None, "common": Namespace(fp16=True, seed=1),
                    "model": model_args(layers, embed_dim, heads, token_dropout),
                    "task": Namespace(_name="masked_lm")},
            "extra_state": {"epoch": 1}, "optimizer_history": []}
    main = directory / f"{name}.pt"
    torch.save(data, main, _use_new_zipfile_serialization=zipfile)
    if regression:
        torch.save({"model": contact}, directory / f"{name}-contact-regression.pt",
                   _use_new_zipfile_serialization=zipfile)
    return main


def load_with_fair_esm(path: str | Path) -> ESM2:
    """fair-esm's own local loader (main file + co-located regression file), in eval mode.

    fair-esm calls `torch.load` without `weights_only`, which torch >= 2.6 defaults to True: the released
    files' `argparse.Namespace` must then be allowed explicitly (upstream does not, see the test).
    """
    import esm.pretrained

    with torch.serialization.safe_globals([Namespace]):
        model, _ = esm.pretrained.load_model_and_alphabet_local(str(path))
    return model.eval()
