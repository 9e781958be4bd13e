"""Adapter math: parameter formulas, zero init, LoRTA factorised forward vs an independent dense CP build,
CP structure of the merged updates, fused-QKV mapping on the ESMFold trunk, merge/unmerge, fp32 adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adapters
from adapters.layer import adapted_linears
from adapters.lorta import stack_factors
from adapters.spec import spec_for
from adapters.zoo import build_meta_model, build_model, fair_esm2

RANK_METHODS = ("lora", "lorta", "tlora")


def cfg(method: str, rank: int = 4, targets=("attn", "mlp"), part: str = "all", **extra):
    return adapters.config_from_dict({"method": method, "rank": rank, "alpha": 2 * rank, "targets": list(targets),
                                      "part": part, **extra})


def tiny_esm2(layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fair_esm2(layers, 32, 4).eval()


def tiny_esmfold(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("tiny_esmfold").eval()


def esm_tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(4, 24, (batch, length), generator=g)
    return torch.cat([torch.zeros(batch, 1, dtype=torch.long), body, torch.full((batch, 1), 2)], dim=1)


def randomize_adapters(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in adapters.adapter_parameter_names(model):
            p = dict(model.named_parameters())[name]
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def esm_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens)["logits"]


# ----------------------------------------------------------------------------- parameter formulas

def lorta_formula(d, heads, layers, m, r):
    return r * (d + d // heads + heads + layers + m)


@pytest.mark.parametrize("name,layers,d,heads", [("esm2_t12_35M_UR50D", 12, 480, 20),
                                                 ("esm2_t33_650M_UR50D", 33, 1280, 20),
                                                 ("esm2_t36_3B_UR50D", 36, 2560, 40)])
@pytest.mark.parametrize("rank", [1, 8, 32])
def test_counts_match_formulas_on_esm2(name, layers, d, heads, rank):
    model = build_meta_model(name)
    for targets, m, mats in ((("attn",), 4, [(d, d)] * 4), (("qv",), 2, [(d, d)] * 2),
                             (("attn", "mlp"), 12, [(d, d)] * 4 + [(d, 4 * d), (4 * d, d)]),
                             (("mlp",), 8, [(d, 4 * d), (4 * d, d)])):
        assert adapters.count_for(model, cfg("lorta", rank, targets)) == lorta_formula(d, heads, layers, m, rank)
        assert adapters.count_for(model, cfg("lora", rank, targets)) == layers * sum(rank * (a + b) for a, b in mats)
        assert adapters.count_for(model, cfg("tlora", rank, targets)) == layers * len(mats) * (rank ** 2 + 1)
    if name == "esm2_t12_35M_UR50D":
        assert adapters.count_for(model, cfg("lorta", rank, ("attn",))) == 540 * rank
        assert adapters.count_for(model, cfg("lorta", rank, ("attn", "mlp"))) == rank * (480 + 24 + 20 + 12 + 12)
    assert adapters.count_for(model, adapters.config_from_dict({"method": "full"})) == adapters.count_total(model)
    assert adapters.count_for(model, adapters.config_from_dict({"method": "none"})) == 0


def test_counts_on_esmfold_v1_trunk_and_attach_on_meta_agrees():
    model = build_meta_model("esmfold_v1")
    r = 4
    counts = adapters.count_for(model, cfg("lorta", r, ("attn",), part="trunk"), per_stack=True)
    assert counts == {"trunk_seq": 1140 * r, "trunk_pair": lorta_formula(128, 4, 48, 8, r), "sm": 0}
    counts = adapters.count_for(model, cfg("lora", r, ("qv",), part="trunk"), per_stack=True)
    # fused proj: only the q and v rows (2*1024) are adapted; pair: start/end q and v
    assert counts == {"trunk_seq": 48 * r * (1024 + 2048), "trunk_pair": 48 * 4 * r * (128 + 128), "sm": 0}
    stem_full = sum(p.numel() for n, p in model.named_parameters() if n.startswith("esm."))
    full_trunk = adapters.count_for(model, adapters.config_from_dict({"method": "full", "part": "trunk"}))
    assert full_trunk == adapters.count_total(model) - stem_full
    # attaching on the meta device works and trains exactly what count_for predicts
    config = cfg("lorta", r, ("attn", "mlp"), part="all")
    adapters.attach(model, config)
    assert adapters.count_trainable(model) == adapters.count_for(model, config)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("rank", [1, 4])
def test_structure_module_target_counts_on_esmfold_v1(rank):
    """Target `sm`: the structure module's 4 square 384 x 384 Linears (linear_in, transition linear_1..3),
    one layer (weights shared by its 8 iterations), the IPA's 12 heads (d_h 32) for LoRTA."""
    model = build_meta_model("esmfold_v1")
    sm = model.trunk.structure_module
    assert len(sm.transition.layers) == 1
    assert [tuple(m.weight.shape) for m in (sm.linear_in, *(getattr(sm.transition.layers[0], f"linear_{j}") for j in (1, 2, 3)))] == [(384, 384)] * 4
    count = {m: adapters.count_for(model, cfg(m, rank, ("sm",), part="trunk"), per_stack=True) for m in RANK_METHODS}
    assert count["lora"] == {"trunk_seq": 0, "trunk_pair": 0, "sm": 4 * rank * (384 + 384)}
    assert count["lorta"]["sm"] == lorta_formula(384, 12, 1, 4, rank) == rank * (384 + 32 + 12 + 1 + 4)
    assert count["tlora"]["sm"] == 4 * (rank ** 2 + 1)
    with pytest.raises(ValueError, match="part"):
        adapters.count_for(model, cfg("lora", rank, ("sm",), part="banana"))


def test_structure_module_target_changes_the_fold_and_merges_exactly():
    """sm adapters act on the final structure (not on the trunk outputs); merge/unmerge through the full fold."""
    model = tiny_esmfold()
    before = fold(model)
    trunk_before = stem_and_trunk(model)
    adapters.attach(model, cfg("lora", 2, ("sm",), part="trunk"))
    randomize_adapters(model)
    for a, b in zip(stem_and_trunk(model), trunk_before):
        assert torch.equal(a, b)  # nothing before the structure module moved
    unmerged = assert_merge_round_trip(model, fold)
    assert (unmerged[0] - before[0]).abs().max() > 1e-3


@pytest.mark.parametrize("method", RANK_METHODS + ("full", "none"))
@pytest.mark.parametrize("part", ["stem", "trunk", "all"])
def test_count_for_equals_attached_count_on_tiny_esmfold(method, part):
    model = build_meta_model("tiny_esmfold")
    config = cfg(method, 3, ("attn", "mlp", "trimul", "sm"), part=part) if method in RANK_METHODS else \
        adapters.config_from_dict({"method": method, "part": part})
    predicted = adapters.count_for(model, config)
    adapters.attach(model, config)
    assert adapters.count_trainable(model) == predicted
    if method == "full" and part == "trunk":
        assert all(p.requires_grad != n.startswith("esm.") for n, p in model.named_parameters())


def test_lora_on_esm2_rejects_trunk_part():
    with pytest.raises(ValueError, match="no trunk"):
        adapters.attach(tiny_esm2(), cfg("lora", part="trunk"))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="rnak"):
        adapters.config_from_dict({"method": "lora", "rnak": 4})
    with pytest.raises(ValueError, match="targets"):
        adapters.config_from_dict({"method": "lorta", "targets": ["ffn"]})
    with pytest.raises(ValueError, match="method"):
        adapters.config_from_dict({"method": "dora"})


# ----------------------------------------------------------------------------- zero init, gradients

@pytest.mark.parametrize("method", RANK_METHODS)
def test_zero_init_keeps_outputs_and_only_adapters_get_gradients(method):
    model = tiny_esm2()
    tokens = esm_tokens()
    before = esm_logits(model, tokens)
    adapters.attach(model, cfg(method))
    after = esm_logits(model, tokens)
    assert torch.equal(before, after)
    after.square().mean().backward()
    names = set(adapters.adapter_parameter_names(model))
    assert names and {n for n, p in model.named_parameters() if p.requires_grad} == names
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in names), name
    # B (zero init) gets a non-zero gradient on the first step
    b_name = {"lora": "lora_B", "lorta": ".B", "tlora": "tlora_B"}[method]
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(b_name))


def test_lorta_factors_registered_once_and_init_as_reference():
    model = tiny_esm2(layers=4)
    adapters.attach(model, cfg("lorta", 16, ("attn", "mlp")))
    names = adapters.adapter_parameter_names(model)
    assert names == [f"lorta_stacks.stem.{f}" for f in ("A", "B", "C_H", "C_L", "C_M")]
    assert [k for k in model.state_dict() if "lorta" in k] == names
    f = stack_factors(model, spec_for(model).stacks[0])
    assert torch.all(f.B == 0)
    assert f.A.abs().max() <= 1 / 16 ** 0.5 and f.A.abs().max() > 0.8 / 16 ** 0.5
    assert f.C_M.abs().max() <= (6 / 16) ** 0.5 and f.C_M.abs().max() > 0.4 * (6 / 16) ** 0.5
    assert f.C_M.shape == (12, 16) and f.C_L.shape == (4, 16) and f.C_H.shape == (4, 16)


# ----------------------------------------------------------------------------- LoRTA vs dense CP

def dense_cp(f, scaling: float) -> torch.Tensor:
    """T[i, h, j, l, m] = scaling * sum_k A[i,k] C_H[h,k] B[k,j] C_L[l,k] C_M[m,k] (independent of the layer code)."""
    return scaling * torch.einsum("ik,hk,kj,lk,mk->ihjlm", f.A, f.C_H, f.B, f.C_L, f.C_M)


def reference_delta(T: torch.Tensor, types: list[str], layer: int, kinds: list[str], head_axis: str,
                    long_axis: str | None, interleaved: bool = False) -> torch.Tensor:
    """Assemble dW (d_out, d_in) block by block / head by head with explicit slicing."""
    d, heads, hd = T.shape[0], T.shape[1], T.shape[2]
    blocks = []
    for kind in kinds:
        g = T[:, :, :, layer, types.index(kind)].reshape(d, d)  # (A side i, head side h*hd+j)
        blocks.append(g.T if head_axis == "out" else g)
    n = len(blocks)
    if long_axis is None:
        return blocks[0]
    if long_axis == "out":
        out = torch.zeros(n * d, d)
        for s, blk in enumerate(blocks):
            for h in range(heads):
                rows = slice(h * n * hd + s * hd, h * n * hd + (s + 1) * hd) if interleaved else \
                    slice(s * d + h * hd, s * d + (h + 1) * hd)
                out[rows] = blk[h * hd:(h + 1) * hd]
        return out
    out = torch.zeros(d, n * d)
    for s, blk in enumerate(blocks):
        out[:, s * d:(s + 1) * d] = blk
    return out


@pytest.mark.parametrize("orientation", ["heads", "output", "input"])
def test_lorta_factorised_forward_equals_dense_cp_on_esm2(orientation):
    base = tiny_esm2(layers=3)
    model = copy.deepcopy(base)
    config = cfg("lorta", 3, ("attn", "mlp"), orientation=orientation)
    adapters.attach(model, config)
    randomize_adapters(model)
    f = stack_factors(model, spec_for(model).stacks[0])
    T = dense_cp(f, config.scaling).detach()
    natural = {"q_proj": "out", "k_proj": "out", "v_proj": "out", "out_proj": "in", "fc1": "out", "fc2": "in"}
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for path, linear, adapter in adapted_linears(model):
            layer, leaf = int(path.split(".")[1]), path.split(".")[-1]
            if leaf in ("fc1", "fc2"):
                kinds, long_axis = [f"{leaf}.{s}" for s in range(4)], ("out" if leaf == "fc1" else "in")
            else:
                kinds, long_axis = [{"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o"}[leaf]], None
            head_axis = natural[leaf] if orientation == "heads" else {"output": "out", "input": "in"}[orientation]
            dW = reference_delta(T, f.types, layer, kinds, head_axis, long_axis)
            xin = torch.randn(5, linear.in_features)
            torch.testing.assert_close(adapter(xin), xin @ dW.T, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(adapter.get_delta_weight(), dW, rtol=1e-4, atol=1e-6)
            reference.get_submodule(path).weight += dW
    tokens = esm_tokens()
    torch.testing.assert_close(esm_logits(model, tokens), esm_logits(reference, tokens), rtol=1e-4, atol=1e-4)


def test_lorta_merged_updates_have_cp_structure():
    rank, layers = 2, 6
    model = tiny_esm2(layers=layers)
    adapters.attach(model, cfg("lorta", rank, ("attn",)))
    randomize_adapters(model)
    f = stack_factors(model, spec_for(model).stacks[0])
    d = 32
    # Recover the (d_A, d_head, L, M) tensor from the dense merged deltas of every layer and matrix type.
    stackT = torch.zeros(d, d, layers, 4)
    with torch.no_grad():
        for path, _, adapter in adapted_linears(model):
            layer, leaf = int(path.split(".")[1]), path.split(".")[-1]
            m = ["q_proj", "k_proj", "v_proj", "out_proj"].index(leaf)
            dW = adapter.get_delta_weight()
            stackT[:, :, layer, m] = dW if leaf == "out_proj" else dW.T  # (A side, head side)
    unfold_layer = stackT.permute(2, 0, 1, 3).reshape(layers, -1)
    unfold_hidden = stackT.reshape(d, -1)
    unfold_head = stackT.reshape(d, 4, 8, layers, 4).permute(1, 0, 2, 3, 4).reshape(4, -1)
    for unfolding in (unfold_layer, unfold_hidden, unfold_head):
        assert torch.linalg.matrix_rank(unfolding, rtol=1e-5) == rank
    # and plain LoRA on the same layers is not CP-structured across layers
    lora = tiny_esm2(layers=layers)
    adapters.attach(lora, cfg("lora", rank, ("attn",)))
    randomize_adapters(lora)
    per_layer = torch.stack([a.get_delta_weight().flatten() for p, _, a in adapted_linears(lora)
                             if p.endswith("q_proj")]).detach()
    assert torch.linalg.matrix_rank(per_layer) == layers
    assert f.C_L.shape == (layers, rank)


# ----------------------------------------------------------------------------- ESMFold trunk: fused qkv

def trunk_inputs(model, length=7, seed=5):
    g = torch.Generator().manual_seed(seed)
    cfg_t = model.config.esmfold_config.trunk
    s = torch.randn(1, length, cfg_t.sequence_state_dim, generator=g)
    z = torch.randn(1, length, length, cfg_t.pairwise_state_dim, generator=g)
    return s, z


def test_fused_qkv_matches_unfused_reference_on_esmfold_trunk():
    model = tiny_esmfold()
    config = cfg("lorta", 3, ("attn",), part="trunk")
    adapters.attach(model, config)
    randomize_adapters(model)
    spec = spec_for(model)
    seq = next(s for s in spec.stacks if s.name == "trunk_seq")
    f = stack_factors(model, seq)
    assert f.types == ["q", "k", "v", "o"]
    T = dense_cp(f, config.scaling).detach()
    attn = model.trunk.blocks[1].seq_attention
    heads, hd, d = attn.num_heads, attn.head_width, attn.embed_dim
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        fused = attn.proj(x).view(2, 5, heads, 3 * hd)
        q, k, v = fused.chunk(3, dim=-1)
        # unfused reference: per-head slices of the base weight + the CP blocks of q, k, v (heads split the output)
        w = attn.proj.weight.view(heads, 3, hd, d)
        for t, got in enumerate((q, k, v)):
            base_w = w[:, t].reshape(d, d)
            delta = T[:, :, :, 1, t].reshape(d, d).T
            want = (x @ (base_w + delta).T).view(2, 5, heads, hd)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # o_proj: heads split the input
        y = torch.randn(2, 5, d)
        want_o = y @ (attn.o_proj.weight + T[:, :, :, 1, 3].reshape(d, d)).T + attn.o_proj.bias
        torch.testing.assert_close(attn.o_proj(y), want_o, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "tlora"])
def test_qv_on_fused_projection_leaves_k_rows_untouched(method):
    model = tiny_esmfold()
    attn = model.trunk.blocks[0].seq_attention
    x = torch.randn(3, attn.embed_dim)
    with torch.no_grad():
        base = attn.proj(x).view(3, attn.num_heads, -1).chunk(3, -1)
    adapters.attach(model, cfg(method, 4, ("qv",), part="trunk"))
    randomize_adapters(model)
    with torch.no_grad():
        q, k, v = attn.proj(x).view(3, attn.num_heads, -1).chunk(3, -1)
    assert torch.equal(k, base[1])
    assert not torch.allclose(q, base[0]) and not torch.allclose(v, base[2])


# ----------------------------------------------------------------------------- merge / unmerge

def fold(model, seed=0):
    """Full ESMFold forward (slow-ish: structure module); final positions and distogram."""
    g = torch.Generator().manual_seed(seed)
    aa = torch.randint(0, 20, (1, 9), generator=g)
    with torch.no_grad():
        out = model(aa, attention_mask=torch.ones_like(aa), num_recycles=0)
    return out["positions"][-1], out["distogram_logits"]


def stem_and_trunk(model, seed=0):
    """Cheap pass through every adapted Linear of ESMFold: the ESM-2 stem and each trunk block."""
    tokens = esm_tokens(1, 8, seed)
    s, z = trunk_inputs(model, length=6, seed=seed)
    with torch.no_grad():
        outs = [model.esm(tokens).last_hidden_state]
        for block in model.trunk.blocks:
            s, z = block(s, z, mask=torch.ones(1, 6))
            outs += [s, z]
    return outs


@pytest.mark.parametrize("method", RANK_METHODS)
def test_merge_unmerge_esm2(method):
    model = tiny_esm2()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters.attach(model, cfg(method))
    randomize_adapters(model)
    tokens = esm_tokens()
    with torch.no_grad():
        unmerged = esm_logits(model, tokens)
        adapters.merge(model)
        merged = esm_logits(model, tokens)
        changed = [n for n, p in model.named_parameters() if n in original and not torch.equal(p, original[n])]
        adapters.unmerge(model)
        restored = esm_logits(model, tokens)
    assert len(changed) == 2 * 6  # 6 adapted Linears per layer
    # fp32: merging rounds each weight (~1e-7 relative); through the layers that reaches ~2e-5 in the logits
    # on some BLAS kernels, so both comparisons share 1e-4; the exact guard is the weight check below.
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(restored, unmerged, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        if n in original:
            torch.testing.assert_close(p, original[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", RANK_METHODS)
def test_merge_unmerge_esmfold(method):
    model = tiny_esmfold()
    adapters.attach(model, cfg(method, 3, ("attn", "mlp", "trimul"), part="all"))
    randomize_adapters(model)
    assert_merge_round_trip(model, stem_and_trunk)


def assert_merge_round_trip(model: nn.Module, run) -> list[torch.Tensor]:
    """run(model) unmerged, merged and unmerged again agree (fp32 rounding of merge + unmerge: CI saw 1.7e-5);
    returns the unmerged outputs."""
    unmerged = run(model)
    adapters.merge(model)
    merged = run(model)
    adapters.unmerge(model)
    restored = run(model)
    for a, b, c in zip(unmerged, merged, restored):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)
    return unmerged


def test_adapters_change_the_esmfold_prediction_from_zero_init():
    model = tiny_esmfold()
    pos0, _ = fold(model)
    before = stem_and_trunk(model)
    adapters.attach(model, cfg("lorta", 3, ("attn", "mlp"), part="all"))
    for a, b in zip(stem_and_trunk(model), before):  # zero init
        assert torch.equal(a, b)
    randomize_adapters(model)
    pos2, _ = fold(model)
    assert (pos2 - pos0).abs().max() > 1e-3


# ----------------------------------------------------------------------------- fused add (addmm)

def _outputs_and_grads(model: nn.Module, run) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad()
    outs = run(model)
    sum(o.square().mean() for o in outs).backward()
    names = set(adapters.adapter_parameter_names(model))
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters() if n in names}


@pytest.mark.parametrize("model_name", ["esm2", "esmfold"])
@pytest.mark.parametrize("method", RANK_METHODS)
def test_fused_addmm_path_equals_plain_add(method, model_name, monkeypatch):
    """The hook's fused `addmm` (fp32) gives the same outputs and adapter gradients as base + delta(x)."""
    if model_name == "esm2":
        model = tiny_esm2()
        adapters.attach(model, cfg(method))

        def run(m):
            return [esm_logits(m, esm_tokens())]
    else:
        model = tiny_esmfold()
        adapters.attach(model, cfg(method, 3, ("attn", "mlp", "trimul"), part="all"))

        def run(m):
            s, z = trunk_inputs(m, length=6)
            outs = [m.esm(esm_tokens(1, 8)).last_hidden_state]
            for block in m.trunk.blocks:
                s, z = block(s, z, mask=torch.ones(1, 6))
                outs += [s, z]
            return outs
    randomize_adapters(model)
    fused = [a for _, _, a in adapted_linears(model) if a.rank_space(torch.zeros(1, a.d_in)) is not None]
    assert fused, "no adapter takes the fused path"
    fused_out, fused_grads = _outputs_and_grads(model, run)
    monkeypatch.setattr(type(fused[0]), "rank_space", lambda self, x: None)
    plain_out, plain_grads = _outputs_and_grads(model, run)
    for a, b in zip(fused_out, plain_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("method", RANK_METHODS)
def test_adapters_stay_fp32_on_a_bf16_base(method):
    model = tiny_esm2()
    adapters.attach(model, cfg(method))
    randomize_adapters(model)
    tokens = esm_tokens()
    with torch.no_grad():
        ref = esm_logits(copy.deepcopy(model), tokens)
    model.to(torch.bfloat16)  # before the first forward: fair-esm caches its rotary tables in the first dtype
    names = set(adapters.adapter_parameter_names(model))
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if n in names else torch.bfloat16), n
    out = esm_logits(model, tokens)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.25 * ref.abs().max()
    out.float().square().mean().backward()
    assert all(dict(model.named_parameters())[n].grad.dtype == torch.float32 for n in names)


# ----------------------------------------------------------------------------- transformers EsmForMaskedLM

def test_hf_esm_masked_lm_sites_counts_and_merge():
    from transformers import EsmConfig, EsmForMaskedLM

    torch.manual_seed(0)
    model = EsmForMaskedLM(EsmConfig(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, pad_token_id=1, mask_token_id=32,
                                     position_embedding_type="rotary")).eval()
    tokens = esm_tokens()
    with torch.no_grad():
        base = model(tokens).logits
    config = cfg("lorta", 2, ("attn", "mlp"))
    adapters.attach(model, config)
    paths = [p for p, _, _ in adapted_linears(model) if ".layer.0." in p]
    assert sorted(paths) == sorted(f"esm.encoder.layer.0.{s}" for s in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense"))
    assert adapters.count_trainable(model) == lorta_formula(32, 4, 2, 12, 2)
    assert adapters.adapter_parameter_names(model)[0] == "esm.lorta_stacks.stem.A"
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, base)
        randomize_adapters(model)
        adapted = model(tokens).logits
        adapters.merge(model)
        torch.testing.assert_close(model(tokens).logits, adapted, rtol=1e-4, atol=1e-4)
    assert (adapted - base).abs().max() > 1e-3
