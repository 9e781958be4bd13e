"""Smoke + correctness tests of the benchmark harness (benchmarks/), on tiny ESM-2 shapes.

The dense-ΔW LoRTA reference is a second, independent implementation of the LoRTA update (built from the
CP factors the way the reference code does); it must reproduce foldtune's factorised forward exactly, or
the "dense is N× slower" number would compare two different models.
"""

from __future__ import annotations

import pytest
import torch

adapters = pytest.importorskip("adapters")
if not hasattr(adapters, "attach"):
    pytest.skip("adapters/ is not written yet", allow_module_level=True)

from benchmarks import bench_adapters as ba  # noqa: E402
from benchmarks.common import Timings, md_table, verdict  # noqa: E402
from benchmarks.lorta_dense import DenseDeltaLoRTA  # noqa: E402

TINY = ba.Workload("tiny", batch=2, length=16, rank=4)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny shapes gain nothing from more, and a shared machine punishes spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lorta_model(targets=("attn",)):
    model = ba.apply_variant(ba.build_esm2("tiny", seed=0), ba.Variant("lorta", targets), rank=4)
    ba.randomize_trainable(model, seed=3, std=0.3)  # B = 0 at init would make ΔW = 0 and the check vacuous
    return model.eval()


@pytest.mark.parametrize("targets,n_adapted", [(("attn",), 2 * 4), (("attn", "mlp"), 2 * 6)])
def test_dense_reference_equals_foldtune_lorta_forward_and_grads(targets, n_adapted):
    model = _lorta_model(targets)
    tokens, labels = ba.mlm_batch(model, 2, 16, seed=1)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(tokens)["logits"]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return logits.detach(), grads

    factorised, grads_f = loss_and_grads()
    dense = DenseDeltaLoRTA(model)
    with dense:
        reference, grads_d = loss_and_grads()
    assert dense.n_adapted == n_adapted  # tiny ESM-2: 2 layers × Q,K,V,O (+ fc1, fc2)
    assert dense.calls == n_adapted  # every adapted Linear took the dense path, none the factorised one
    assert len(dense.factors) == 1 and sum(len(u) for u in dense.updates.values()) == 0  # cleared on exit
    # the adapter must matter at this scale, otherwise equality says nothing
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.mul_(0)
        plain = model(tokens)["logits"]
    assert (factorised - plain).abs().max() > 1e-3
    torch.testing.assert_close(reference, factorised, rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_d.keys() and grads_f
    for name in grads_f:
        torch.testing.assert_close(grads_d[name], grads_f[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dense_hooks_are_removed_on_exit():
    model = _lorta_model()
    tokens, _ = ba.mlm_batch(model, 2, 16, seed=1)
    with torch.no_grad():
        before = model(tokens)["logits"]
        with DenseDeltaLoRTA(model):
            pass
        after = model(tokens)["logits"]
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_step_table_rows_and_goal_columns(monkeypatch):
    # no subprocess memory workers in a unit test: measure in-process
    monkeypatch.setattr(ba, "measure_train_memory",
                        lambda work, variant, steps=2, fresh_process=True: {"peak_mb": 100.0, "delta_mb": 10.0})
    per_method, goals, memory = ba.step_sections(TINY, warmup=0, repeats=2)
    labels = [row[0] for row in per_method.rows]
    assert labels == [v.label for v in ba.method_variants()]
    assert per_method.headers[:3] == ["variant", "trainable params", "median step (s)"]
    counts = dict(zip(labels, (row[1] for row in per_method.rows)))
    # LoRA on Q,K,V,O of 2 layers of width 64 at rank 4: 2 · 4 · 4 · (64 + 64)
    assert counts["lora attn"] == counts["peft_lora attn"] == 2 * 4 * 4 * 128
    assert counts["full"] == sum(p.numel() for p in ba.build_esm2("tiny").parameters())
    assert [row[0] for row in goals.rows] == [
        "LoRTA / LoRA step (attn)", "LoRTA / LoRA step (attn+mlp)",
        "foldtune LoRA / peft LoRA step (attn)", "foldtune LoRA / peft LoRA step (attn+mlp)"]
    assert all(row[3] in ("met", "missed") for row in goals.rows)
    assert memory.rows[0][0] == "lora attn+mlp / full" and memory.rows[0][1] == pytest.approx(1.0)
    assert "| variant |" in per_method.markdown()


def test_merged_section_reports_every_method():
    (section,) = ba.merged_sections(TINY, warmup=0, repeats=2)
    assert [row[0] for row in section.rows][0] == "base"
    assert len(section.rows) + sum("merge failed" in n for n in section.notes) == 1 + len(ba.FOLDTUNE_METHODS)
    for note in section.notes:
        if "max |logits" in note:
            assert float(note.split("= ")[1].split(";")[0]) < 1e-4, note


def test_timing_ratio_is_paired_median_and_verdicts():
    t = Timings({"a": [2.0, 4.0, 2.2], "b": [1.0, 2.0, 1.0]})
    assert t.ratio("a", "b") == pytest.approx(2.0)
    assert verdict(1.04, "<=", 1.05) == "met" and verdict(1.9, ">=", 2.0) == "missed"
    assert md_table(["x", "y"], [[1, 0.5]]).splitlines() == ["| x | y |", "|---|---|", "| 1 | 0.5 |"]
