"""Memory plan for fine-tuning ESMFold v1: step peak memory measured on CPU at the real widths with 1-3 stem
layers / trunk blocks, per-unit costs fitted, and extrapolated to the full 36 layers + 48 blocks.

    python -m benchmarks.bench_memory_plan --out .bench/memory_plan.md [--crops 128 256] [--json pipeline/memory_plan.json]

Shapes: ESM-2 3B stem widths (2560 hidden, 40 heads, 10240 MLP), trunk seq 1024 / pair 128 (head width 32),
structure module 384 / 128 (8 blocks); batch 1, one real chain cropped to `crop`, fp32, no recycling.

One measurement = a fresh process: the model with N stem layers and M trunk blocks (random weights), the
method attached, one forward + `pipeline.losses.folding_loss` + backward; the peak resident memory (VmHWM)
above the process's memory before the model was built. That includes weights, activations and gradients;
the AdamW state (2 x 4 bytes per trainable parameter) is added analytically (it is exact), so the optimizer
step itself is not run.

Model of the cost: peak(N, M, L) = F(L) + N * S(L) + M * T(L) + 8 * trainable, where S is a stem layer
(weights; plus activations and gradients when the stem is trained), T a trunk block (L^2 pair activations
dominate) and F the rest (embeddings, structure module, heads, the crop's inputs). S and T come from
(2, 1) - (1, 1) and (1, 2) - (1, 1); the fit is checked against a measured (3, 1) and (1, 3) before being
extrapolated to N = 36, M = 48. Per crop a separate fit (no assumption on how S and T grow with L: a block's
pair activations grow ~L^2, 0.77 -> 2.1 GB from crop 128 to 256). Trunk checkpointing adds a fixed offset
(one block recomputed during its backward), and the prediction is at least weights + gradients + AdamW state
(their sum at the optimizer step). `--json` writes the predicted table that `foldtune train --dry-run` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    REPO_ROOT, PeakMemory, WorkerFailed, _status_kib, info_block, load_average, log, machine_info, make_section,
    run_worker,
)

STEM = {"hidden_size": 2560, "num_attention_heads": 40, "intermediate_size": 10240}
TRUNK = {"sequence_state_dim": 1024, "pairwise_state_dim": 128, "sequence_head_width": 32,
         "pairwise_head_width": 32,
         "structure_module": {"sequence_dim": 384, "pairwise_dim": 128, "ipa_dim": 16, "resnet_dim": 128,
                              "num_heads_ipa": 12, "num_qk_points": 4, "num_v_points": 8, "num_blocks": 8}}
# `--widths tiny`: the project's tiny folding widths, for a smoke test of this script (numbers mean nothing).
WIDTHS = {"v1": (STEM, TRUNK),
          "tiny": ({"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64},
                   {"sequence_state_dim": 64, "pairwise_state_dim": 32, "sequence_head_width": 16,
                    "pairwise_head_width": 16})}
FULL_LAYERS, FULL_BLOCKS = 36, 48
GPU_SIZES_GB = (40, 80, 141)
# (method, stem trained): what is measured. "frozen" = adapters on the trunk only, the stem not trained.
MODES = {"lora+stem": ("lora", True), "lorta+stem": ("lorta", True), "lora frozen stem": ("lora", False),
         "full": ("full", True)}


@dataclass(frozen=True)
class Point:
    crop: int
    layers: int
    blocks: int
    mode: str
    checkpointing: bool
    rank: int = 8
    widths: str = "v1"


def _structures() -> Path:
    here = REPO_ROOT.parent / "shared" / "data" / "structures"
    return here if here.is_dir() else Path("/work/shared/data/structures")


def _size(layers: int, blocks: int, widths: str = "v1") -> dict:
    stem, trunk = WIDTHS[widths]
    return {**stem, "num_hidden_layers": layers, "trunk": {**trunk, "num_blocks": blocks}}


def _attach(model, mode: str, rank: int) -> None:
    import adapters

    method, stem_trained = MODES[mode]
    part = "all" if stem_trained else "trunk"
    if method == "full":
        model.requires_grad_(False)
        adapters.attach(model, adapters.config_from_dict({"method": "full", "part": part}))
    else:
        adapters.attach(model, adapters.config_from_dict({
            "method": method, "rank": rank, "alpha": 2 * rank, "targets": ["attn", "mlp"], "part": part,
            "dropout": 0.0}))


def _batch(crop: int) -> dict:
    from data.dataset import collate
    from data.structure import read_chain

    for name, chain_id in (("6wqa.cif", None), ("5ugo.pdb", "A"), ("7w1f_B_target.pdb", None)):
        chain = read_chain(_structures() / name, chain=chain_id).observed_residues()
        if len(chain) >= crop:
            break
    window = slice(0, min(crop, len(chain)))
    item = {
        "aatype": torch.from_numpy(chain.aatype[window].copy()),
        "residue_index": torch.from_numpy(chain.residue_index[window].copy()),
        "mask": torch.ones(window.stop),
        "atom37_positions": torch.from_numpy(chain.atom37_positions[window].copy()),
        "atom37_mask": torch.from_numpy(chain.atom37_mask[window].copy()),
        "chain_id": chain.chain_id,
    }
    return collate([item])


def measure(point: Point) -> dict:
    """Peak memory of one fwd + loss + bwd (this process), MiB above the memory before the model existed."""
    from pipeline.losses import folding_loss
    from pipeline.models import build_folding_model

    batch = _batch(point.crop)
    before_mb = _status_kib("VmRSS") / 1024
    model = build_folding_model({"source": "random", "size": _size(point.layers, point.blocks, point.widths)})
    _attach(model, point.mode, point.rank)
    model.set_grad_checkpointing(point.checkpointing)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    with PeakMemory("cpu") as mem:
        outputs = model(input_ids=batch["aatype"], attention_mask=batch["mask"], position_ids=batch["residue_index"],
                        num_recycles=0)
        loss, _ = folding_loss(outputs, batch)
        loss.backward()
    return {"peak_mb": mem.peak_mb - before_mb, "weights_mb": mem.baseline_mb - before_mb,
            "trainable": trainable, "total": total, "crop": int(batch["aatype"].shape[1]),
            "seconds": time.perf_counter() - start}


def _worker(payload: dict) -> dict:
    torch.set_num_threads(int(payload.get("threads", 2)))
    torch.manual_seed(0)
    return measure(Point(**payload["point"]))


def full_size_trainable(mode: str, rank: int = 8, widths: str = "v1") -> tuple[int, int]:
    """(trainable, total) parameters of the full 36-layer / 48-block model with ``mode``, on the meta device."""
    from pipeline.models import build_folding_model

    with torch.device("meta"):
        model = build_folding_model({"source": "random", "size": _size(FULL_LAYERS, FULL_BLOCKS, widths)})
        _attach(model, mode, rank)
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def plan(crops: list[int], widths: str = "v1") -> list[Point]:
    points = []
    for crop in crops:
        for mode in ("lora+stem", "lora frozen stem", "full"):
            points += [Point(crop, 1, 1, mode, False, widths=widths), Point(crop, 2, 1, mode, False, widths=widths)]
        points += [Point(crop, 1, 2, "lora+stem", False, widths=widths), Point(crop, 1, 1, "lora+stem", True, widths=widths),
                   Point(crop, 1, 2, "lora+stem", True, widths=widths)]
    points += [Point(crops[0], 1, 1, "lorta+stem", False, widths=widths),  # LoRTA vs LoRA: the cheapest crop
               Point(crops[0], 2, 1, "lorta+stem", False, widths=widths)]
    # depth checks of the linear model (the smallest crop: cheapest)
    points += [Point(crops[0], 3, 1, "lora+stem", False, widths=widths),
               Point(crops[0], 1, 3, "lora+stem", False, widths=widths),
               Point(crops[0], 1, 3, "lora+stem", True, widths=widths)]
    return points


def reuse(markdown: Path, widths: str = "v1") -> dict[Point, dict]:
    """Measurements of an earlier run's "Measured" table (its --out file), so that a rerun measures only new points."""
    found: dict[Point, dict] = {}
    for line in markdown.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 8 or not cells[0].isdigit():
            continue
        crop, layers, blocks, mode, ckpt, peak, trainable, seconds = cells
        if mode not in MODES:
            continue
        point = Point(int(crop), int(layers), int(blocks), mode, ckpt == "on", widths=widths)
        found[point] = {"peak_mb": float(peak), "trainable": int(float(trainable) * 1e6), "seconds": float(seconds)}
    return found


def fit(results: dict[Point, dict], crops: list[int], block_floor_mb: float = 0.0) -> dict:
    """Per crop: stem layer S per mode, trunk block T per checkpointing, fixed part F (MiB, no optimizer).

    ``block_floor_mb``: what a block holds at least (its weights); a checkpointed block's difference is below
    the resident-memory noise (~50-100 MiB) at small crops, so it is taken as at least that.
    """
    out: dict = {}
    for crop in crops:
        peak = {(p.layers, p.blocks, p.mode, p.checkpointing): r["peak_mb"] for p, r in results.items()
                if p.crop == crop}
        entry: dict = {"stem_layer": {}, "fixed": {}, "block": {}}
        for mode in MODES:
            if (1, 1, mode, False) in peak and (2, 1, mode, False) in peak:
                entry["stem_layer"][mode] = peak[(2, 1, mode, False)] - peak[(1, 1, mode, False)]
        for ckpt in (False, True):
            if (1, 1, "lora+stem", ckpt) in peak and (1, 2, "lora+stem", ckpt) in peak:
                entry["block"]["on" if ckpt else "off"] = max(
                    peak[(1, 2, "lora+stem", ckpt)] - peak[(1, 1, "lora+stem", ckpt)], block_floor_mb)
        block_off = entry["block"].get("off")
        for mode, layer in entry["stem_layer"].items():
            if block_off is not None:
                entry["fixed"][mode] = peak[(1, 1, mode, False)] - layer - block_off
        # Checkpointing also holds one block's recomputed activations during its backward: a fixed offset,
        # measured at (1, 1) against the model without checkpointing.
        entry["ckpt_offset"] = {"off": 0.0}
        if "on" in entry["block"] and "lora+stem" in entry["fixed"] and (1, 1, "lora+stem", True) in peak:
            entry["ckpt_offset"]["on"] = (peak[(1, 1, "lora+stem", True)] - entry["fixed"]["lora+stem"]
                                          - entry["stem_layer"]["lora+stem"] - entry["block"]["on"])
        out[crop] = entry
    return out


def predict_mb(entry: dict, mode: str, checkpointing: bool, layers: int, blocks: int, trainable: int,
               full_block_extra_mb: float = 0.0) -> float:
    """Step peak (MiB) of N layers / M blocks from one crop's fit, AdamW state included."""
    state = "on" if checkpointing else "off"
    block = entry["block"][state] + full_block_extra_mb
    return (entry["fixed"][mode] + entry.get("ckpt_offset", {}).get(state, 0.0) + layers * entry["stem_layer"][mode]
            + blocks * block + 8 * trainable / 2**20)


def run(crops: list[int], threads: int, widths: str = "v1", fresh_process: bool = True,
        known: dict[Point, dict] | None = None) -> tuple[list, dict]:
    """Measure the plan's points (a fresh process each unless ``fresh_process`` is False: a smoke test;
    ``known``: earlier measurements, reused), fit, extrapolate; returns (markdown sections,
    {"crops": {crop: {"method|ckpt": predicted GB}}, ...})."""
    points = plan(crops, widths)
    results: dict[Point, dict] = {}
    for k, point in enumerate(points, 1):
        if known and point in known:
            results[point] = known[point]
            continue
        log(f"[{k}/{len(points)}] {point}")
        if not fresh_process:
            results[point] = measure(point)
            continue
        try:
            results[point] = run_worker("benchmarks.bench_memory_plan",
                                        {"point": asdict(point), "threads": threads}, timeout=900)
        except WorkerFailed as exc:
            log(f"failed: {exc.summary}")
    block_weights_mb = 4 * _block_params(widths) / 2**20
    fits = fit(results, crops, block_floor_mb=block_weights_mb)
    sections = []
    rows = [[p.crop, p.layers, p.blocks, p.mode, "on" if p.checkpointing else "off", f"{r['peak_mb']:.0f}",
             f"{r['trainable'] / 1e6:.2f}", f"{r['seconds']:.1f}"] for p, r in results.items()]
    sections.append(make_section(
        "Measured: one training step (fwd + loss + bwd), ESMFold v1 widths, few layers / blocks, fp32, CPU",
        ["crop", "stem layers", "trunk blocks", "method", "trunk checkpointing", "peak above start (MiB)",
         "trainable (M)", "fwd+bwd (s)"], rows,
        ["peak = VmHWM of a fresh process minus its RSS before the model was built: weights + activations + "
         "gradients (no optimizer state; added below as 8 bytes per trainable parameter)"]))
    fit_rows, check_notes = [], []
    for crop, entry in fits.items():
        for mode, layer in entry["stem_layer"].items():
            fit_rows.append([crop, mode, f"{layer:.0f}", f"{entry['block'].get('off', float('nan')):.0f}",
                             f"{entry['block'].get('on', float('nan')):.0f}", f"{entry['fixed'].get(mode, float('nan')):.0f}"])
        for (layers, blocks, ckpt) in ((3, 1, False), (1, 3, False), (1, 3, True)):
            point = next((p for p in results if (p.crop, p.layers, p.blocks, p.mode, p.checkpointing)
                          == (crop, layers, blocks, "lora+stem", ckpt)), None)
            state = "on" if ckpt else "off"
            if point is not None and "lora+stem" in entry["fixed"] and state in entry["block"]:
                predicted = (entry["fixed"]["lora+stem"] + layers * entry["stem_layer"]["lora+stem"]
                             + blocks * entry["block"][state] + entry.get("ckpt_offset", {}).get(state, 0.0))
                measured = results[point]["peak_mb"]
                check_notes.append(f"depth check crop {crop}, {layers} layers / {blocks} blocks (lora+stem, trunk "
                                   f"checkpointing {state}): predicted {predicted:.0f} MiB, measured {measured:.0f} "
                                   f"MiB ({(predicted - measured) / measured * 100:+.1f} %)")
    check_notes.append(f"a checkpointed block is taken as at least its weights ({block_weights_mb:.0f} MiB) when the "
                       "measured difference is smaller (below the resident-memory noise); checkpointing adds a "
                       "fixed offset (one block recomputed during backward), measured at (1, 1): "
                       + ", ".join(f"crop {c} {e['ckpt_offset'].get('on', float('nan')):.0f} MiB" for c, e in fits.items()))
    sections.append(make_section("Per-unit costs (MiB), from the (2,1) - (1,1) and (1,2) - (1,1) differences",
                                 ["crop", "method", "stem layer", "trunk block (ckpt off)", "trunk block (ckpt on)",
                                  "rest F"], fit_rows, check_notes))
    # Extrapolation to 36 layers + 48 blocks.
    counts = {mode: full_size_trainable(mode, widths=widths)
              for mode in ("lora+stem", "lorta+stem", "lora frozen stem", "full")}
    block_params = None
    pred_rows, plan_json = [], {"crops": {}, "gpu_sizes_gb": list(GPU_SIZES_GB)}
    for crop, entry in fits.items():
        plan_json["crops"][str(crop)] = {}
        for mode in ("lora+stem", "lorta+stem", "lora frozen stem", "full"):
            measured_mode = mode if mode in entry["stem_layer"] else "lora+stem"
            if measured_mode not in entry["fixed"]:
                continue
            for ckpt in (False, True):
                if ("on" if ckpt else "off") not in entry["block"]:
                    continue
                extra = 0.0
                if mode == "full":
                    # a trained block also holds its gradients (4 B / param; AdamW is in `trainable`)
                    if block_params is None:
                        block_params = _block_params(widths)
                    extra = 4 * block_params / 2**20
                trainable, total = counts[mode]
                mb = predict_mb({**entry, "fixed": {measured_mode: entry["fixed"][measured_mode]},
                                 "stem_layer": {measured_mode: entry["stem_layer"][measured_mode]}},
                                measured_mode, ckpt, FULL_LAYERS, FULL_BLOCKS, trainable, extra)
                # At the optimizer step weights, every gradient and the AdamW state coexist (activations freed):
                # with few layers the measured peak falls earlier in backward, before most gradients exist.
                mb = max(mb, (4 * total + 12 * trainable) / 2**20)
                gb = mb / 1024
                fits_in = [f"{size}" for size in GPU_SIZES_GB if gb <= size]
                pred_rows.append([crop, mode, "on" if ckpt else "off", f"{gb:.1f}",
                                  ", ".join(fits_in) + " GB" if fits_in else "none"])
                plan_json["crops"][str(crop)][f"{mode}|{'on' if ckpt else 'off'}"] = round(gb, 2)
    sections.append(make_section(
        f"Predicted step peak of ESMFold v1 ({FULL_LAYERS} stem layers + {FULL_BLOCKS} trunk blocks), fp32, batch 1",
        ["crop", "method", "trunk checkpointing", "predicted peak (GB)", "fits"], pred_rows,
        ["predicted = F + 36 S + 48 T + AdamW state (8 B x trainable parameters of the full model, counted on the "
         "meta device), and at least weights + gradients + AdamW state together (4 B x all + 12 B x trainable "
         "parameters: the optimizer step; this floor decides 'full', ~52.5 GB); 'full' trains everything (its "
         "trunk blocks also hold gradients: + 4 B x block params); "
         "GB = 2^30 bytes; GPU framework overhead (CUDA context, allocator fragmentation, ~1-3 GB) is not in it",
         "bf16 autocast not measured on CPU: it halves activation bytes of the matmuls it covers, not the fp32 "
         "weights, gradients or optimizer state"]))
    return sections, plan_json


def _block_params(widths: str = "v1") -> int:
    from pipeline.models import build_folding_model

    with torch.device("meta"):
        model = build_folding_model({"source": "random", "size": _size(1, 1, widths)})
    return sum(p.numel() for p in model.trunk.blocks[0].parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".bench" / "memory_plan.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the predicted table (GB) as JSON")
    parser.add_argument("--crops", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse", type=Path, nargs="*", default=[],
                        help="earlier --out files: their measured points are not measured again")
    parser.add_argument("--widths", choices=sorted(WIDTHS), default="v1",
                        help="v1: ESMFold v1 widths (the plan); tiny: a fast smoke test of this script")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    load_before = load_average()
    known: dict[Point, dict] = {}
    for earlier in args.reuse:
        known.update(reuse(earlier, args.widths))
    sections, plan_json = run(sorted(args.crops), args.threads, args.widths, known=known)
    text = "\n".join(s.markdown() for s in sections) + "\n" + info_block(
        machine_info(), "python -m benchmarks.bench_memory_plan " + " ".join(argv or sys.argv[1:]), load_before,
        load_average()) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(plan_json, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
