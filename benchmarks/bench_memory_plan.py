"""Memory plan for fine-tuning ESMFold v1: step peak memory measured on CPU at the real widths with 1-3 stem
layers / trunk blocks, per-unit costs fitted, and extrapolated to the full 36 layers + 48 blocks, in fp32 and
under bf16 autocast.

    python -m benchmarks.bench_memory_plan --out .bench/memory_plan.md [--crops 128 256 384] [--bf16-crops 128 256]
        [--mode-crops 128 256] [--depth-crops 128 384] [--max-gib 12] [--reuse EARLIER.md ...] [--json pipeline/memory_plan.json]

Shapes: ESM-2 3B stem widths (2560 hidden, 40 heads, 10240 MLP), trunk seq 1024 / pair 128 (head width 32),
structure module 384 / 128 (8 blocks); batch 1, one real chain cropped to `crop`, no recycling.

One measurement = a fresh process: the model with N stem layers and M trunk blocks (random fp32 weights), the
method attached, one forward + `pipeline.losses.folding_loss` + backward; the peak resident memory (VmHWM)
above the process's memory before the model was built. That includes weights, activations and gradients;
the AdamW state (2 x 4 bytes per trainable parameter) is added analytically (it is exact), so the optimizer
step itself is not run. Precision bf16 = what `trainer.precision: bf16-mixed` runs: Lightning's own
bf16-mixed plugin context (CPU autocast, cache_enabled=False) around forward + loss, backward outside it; the
structure module is not kept in fp32 in training (only `foldtune predict` does that), the losses are.

Model of the cost: peak(N, M, L) = F(L) + N * S(L) + M * T(L) + 8 * trainable, where S is a stem layer
(weights; plus activations and gradients when the stem is trained), T a trunk block (L^2 pair activations
dominate) and F the rest (embeddings, structure module, heads, the crop's inputs). S and T come from
(2, 1) - (1, 1) and (1, 2) - (1, 1); the fit is checked against a measured (3, 1) and (1, 3) before being
extrapolated to N = 36, M = 48. Per precision and crop a separate fit (no assumption on how S and T grow with
L), except where a point exceeds the memory budget (`--max-gib`, per worker: such a point is stopped, or not
started when the fit already predicts more, and becomes a table entry): a missing (1, 2) point without
checkpointing gets T from the other crops (w + a L + b L^2), which the checkpointed rows do not depend on.
Trunk checkpointing adds a fixed offset (one block recomputed during its backward), and the prediction is at
least weights + gradients + AdamW state (their sum at the optimizer step). `--json` writes the predicted table
that `foldtune train --dry-run` reads (pipeline/memory_plan.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    REPO_ROOT, PeakMemory, Section, WorkerFailed, _status_kib, info_block, load_average, log, machine_info, make_section,
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
PRECISIONS = ("fp32", "bf16")
OVER_BUDGET = 75  # a worker's exit code when its RSS passed --max-gib
WORKER_TIMEOUT_S = 1800
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
    precision: str = "fp32"  # "fp32" or "bf16" (Lightning's bf16-mixed: CPU autocast around forward + loss)


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


def _step_context(precision: str):
    """What training wraps around forward + loss: Lightning's own bf16-mixed plugin (torch.autocast on the
    device, cache_enabled=False), so the measured step is the one `trainer.precision: bf16-mixed` runs."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        from lightning.pytorch.plugins.precision import MixedPrecision

        return MixedPrecision("bf16-mixed", "cpu").forward_context()
    raise ValueError(f"precision: {precision!r}: expected one of {', '.join(PRECISIONS)}")


def measure(point: Point) -> dict:
    """Peak memory of one fwd + loss + bwd (this process), MiB above the memory before the model existed."""
    from pipeline.losses import folding_loss
    from pipeline.models import build_folding_model

    batch = _batch(point.crop)
    before_mb = _status_kib("VmRSS") / 1024
    model = build_folding_model({"source": "random", "size": _size(point.layers, point.blocks, point.widths)})
    model.float()  # as training builds it (pipeline.train._build): fp32 weights whatever the precision
    _attach(model, point.mode, point.rank)
    model.set_grad_checkpointing(point.checkpointing)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    with PeakMemory("cpu") as mem:
        # Lightning runs training_step (forward + loss) inside the precision context and backward outside it.
        with _step_context(point.precision):
            outputs = model(input_ids=batch["aatype"], attention_mask=batch["mask"],
                            position_ids=batch["residue_index"], num_recycles=0)
            loss, _ = folding_loss(outputs, batch)
        loss.backward()
    return {"peak_mb": mem.peak_mb - before_mb, "weights_mb": mem.baseline_mb - before_mb,
            "trainable": trainable, "total": total, "crop": int(batch["aatype"].shape[1]),
            "seconds": time.perf_counter() - start}


def _watch_rss(limit_gib: float, interval_s: float = 0.01) -> None:
    """Exit this worker (code OVER_BUDGET) as soon as its resident memory passes ``limit_gib``: the machine is
    shared, and a point past the budget becomes a table entry instead of an out-of-memory kill."""
    page = os.sysconf("SC_PAGE_SIZE")
    limit = limit_gib * 2**30

    def watch() -> None:
        while True:
            with open("/proc/self/statm") as statm:
                rss = int(statm.read().split()[1]) * page
            if rss > limit:
                sys.stderr.write(f"over budget: RSS {rss / 2**30:.2f} GiB > {limit_gib} GiB\n")
                sys.stderr.flush()
                os._exit(OVER_BUDGET)
            time.sleep(interval_s)

    threading.Thread(target=watch, daemon=True).start()


def _worker(payload: dict) -> dict:
    torch.set_num_threads(int(payload.get("threads", 2)))
    torch.manual_seed(0)
    if payload.get("max_gib"):
        _watch_rss(float(payload["max_gib"]))
    return measure(Point(**payload["point"]))


def full_size_trainable(mode: str, rank: int = 8, widths: str = "v1") -> tuple[int, int]:
    """(trainable, total) parameters of the full 36-layer / 48-block model with ``mode``, on the meta device."""
    from pipeline.models import build_folding_model

    with torch.device("meta"):
        model = build_folding_model({"source": "random", "size": _size(FULL_LAYERS, FULL_BLOCKS, widths)})
        _attach(model, mode, rank)
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def plan(crops: list[int], widths: str = "v1", precision: str = "fp32", mode_crops: list[int] | None = None,
         depth_crops: list[int] | None = None) -> list[Point]:
    """The points of one precision. lora+stem's fit points (1,1), (2,1), (1,2) and checkpointed (1,1), (1,2) at
    every crop; the frozen stem and full at ``mode_crops`` (default: every crop), where they change the stem
    term only; LoRTA at the smallest crop; the depth checks (3,1), (1,3), checkpointed (1,3) at ``depth_crops``
    (default: the smallest crop)."""
    mode_crops = crops if mode_crops is None else mode_crops
    depth_crops = crops[:1] if depth_crops is None else depth_crops

    def at(crop: int, layers: int, blocks: int, mode: str, ckpt: bool) -> Point:
        return Point(crop, layers, blocks, mode, ckpt, widths=widths, precision=precision)

    points = []
    for crop in crops:
        points += [at(crop, 1, 1, "lora+stem", False), at(crop, 2, 1, "lora+stem", False)]
        for mode in ("lora frozen stem", "full"):
            if crop in mode_crops:
                points += [at(crop, 1, 1, mode, False), at(crop, 2, 1, mode, False)]
        points += [at(crop, 1, 2, "lora+stem", False), at(crop, 1, 1, "lora+stem", True),
                   at(crop, 1, 2, "lora+stem", True)]
    points += [at(crops[0], 1, 1, "lorta+stem", False),  # LoRTA vs LoRA: the cheapest crop
               at(crops[0], 2, 1, "lorta+stem", False)]
    for crop in (c for c in crops if c in depth_crops):  # depth checks of the linear model
        points += [at(crop, 3, 1, "lora+stem", False), at(crop, 1, 3, "lora+stem", True),
                   at(crop, 1, 3, "lora+stem", False)]
    return points


MEASURED_HEADERS = ["crop", "precision", "stem layers", "trunk blocks", "method", "trunk checkpointing",
                    "peak above start (MiB)", "trainable (M)", "fwd+bwd (s)", "measured (UTC)"]


def reuse(markdown: Path, widths: str = "v1") -> dict[Point, dict]:
    """Measurements of an earlier run's "Measured" table (its --out file, or docs/benchmarks.md), so that a rerun
    measures only new points. Rows of the table before precision was a column (8 cells) are fp32. A point that
    did not finish (over the memory budget, worker died) is reused as such: delete its row to measure it again."""
    found: dict[Point, dict] = {}
    for line in markdown.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not cells[0].isdigit():
            continue
        if len(cells) == 8:  # the fp32-only table of the first runs
            crop, layers, blocks, mode, ckpt, peak, trainable, seconds = cells
            precision, when = "fp32", "earlier run"
        elif len(cells) == len(MEASURED_HEADERS):
            crop, precision, layers, blocks, mode, ckpt, peak, trainable, seconds, when = cells
        else:
            continue
        if mode not in MODES or precision not in PRECISIONS:
            continue
        point = Point(int(crop), int(layers), int(blocks), mode, ckpt == "on", widths=widths, precision=precision)
        try:
            found[point] = {"peak_mb": float(peak), "trainable": int(float(trainable) * 1e6),
                            "seconds": float(seconds), "measured": when}
        except ValueError:  # "over budget ..." / "worker exit ..." in the peak cell
            found[point] = {"failed": peak, "measured": when}
    return found


def block_off_from_crops(known: dict[int, float], crop: int, floor_mb: float) -> float | None:
    """A trunk block's cost without checkpointing at ``crop`` from the crops where it was measured, when its
    (1,2) point could not be (over the memory budget): T(L) = w + a L + b L^2, w = the block's weights (the
    block term at L = 0), a and b by least squares (exact with two crops): per-residue single activations and
    L^2 pair activations. None with fewer than two crops."""
    if len(known) < 2:
        return None
    rows = [[length, length * length] for length in known]
    values = [known[length] - floor_mb for length in known]
    solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                                  torch.tensor(values, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1)
    return floor_mb + float(solution[0]) * crop + float(solution[1]) * crop * crop


def fit(results: dict[Point, dict], crops: list[int], block_floor_mb: float = 0.0, precision: str = "fp32") -> dict:
    """Per crop of one precision: stem layer S per mode, trunk block T per checkpointing, fixed part F (MiB, no
    optimizer), checkpointing offset. Points that did not finish (``"failed"``) are left out; a crop whose
    (1,2) point without checkpointing is missing gets that block term from the other crops
    (`block_off_from_crops`, named in ``entry["estimated"]``) so that F, and with it the checkpointed rows, which
    do not depend on that estimate (F + offset = the checkpointed (1,1) - S - T_on), stay defined.

    ``block_floor_mb``: what a block holds at least (its weights); a checkpointed block's difference is below
    the resident-memory noise (~50-100 MiB) at small crops, so it is taken as at least that.
    """
    out: dict = {}
    peaks: dict[int, dict] = {}
    for crop in crops:
        peak = {(p.layers, p.blocks, p.mode, p.checkpointing): r["peak_mb"] for p, r in results.items()
                if p.crop == crop and p.precision == precision and "peak_mb" in r}
        peaks[crop] = peak
        entry: dict = {"stem_layer": {}, "fixed": {}, "block": {}, "ckpt_offset": {"off": 0.0}}
        for mode in MODES:
            if (1, 1, mode, False) in peak and (2, 1, mode, False) in peak:
                entry["stem_layer"][mode] = peak[(2, 1, mode, False)] - peak[(1, 1, mode, False)]
        for ckpt in (False, True):
            if (1, 1, "lora+stem", ckpt) in peak and (1, 2, "lora+stem", ckpt) in peak:
                entry["block"]["on" if ckpt else "off"] = max(
                    peak[(1, 2, "lora+stem", ckpt)] - peak[(1, 1, "lora+stem", ckpt)], block_floor_mb)
        out[crop] = entry
    measured_off = {crop: e["block"]["off"] for crop, e in out.items() if "off" in e["block"]}
    for crop, entry in out.items():
        peak = peaks[crop]
        if "off" not in entry["block"] and entry["stem_layer"]:
            others = {c: t for c, t in measured_off.items() if c != crop}
            estimate = block_off_from_crops(others, crop, block_floor_mb)
            if estimate is not None:
                entry["block"]["off"] = estimate
                entry["estimated"] = (f"trunk block (ckpt off) {estimate:.0f} MiB extrapolated from crops "
                                      f"{', '.join(map(str, sorted(others)))} (w + a L + b L^2)")
        block_off = entry["block"].get("off")
        for mode, layer in entry["stem_layer"].items():
            if block_off is not None:
                entry["fixed"][mode] = peak[(1, 1, mode, False)] - layer - block_off
        # Checkpointing also holds one block's recomputed activations during its backward: a fixed offset,
        # measured at (1, 1) against the model without checkpointing.
        if "on" in entry["block"] and "lora+stem" in entry["fixed"] and (1, 1, "lora+stem", True) in peak:
            entry["ckpt_offset"]["on"] = (peak[(1, 1, "lora+stem", True)] - entry["fixed"]["lora+stem"]
                                          - entry["stem_layer"]["lora+stem"] - entry["block"]["on"])
    return out


def fitted_peak_mb(entry: dict, layers: int, blocks: int, checkpointing: bool) -> float | None:
    """lora+stem's peak (MiB, no optimizer state) of a few-layer point from one crop's fit; None before the fit
    points are measured. The depth check compares it with a measurement; the budget check skips points by it."""
    state = "on" if checkpointing else "off"
    if "lora+stem" not in entry["fixed"] or state not in entry["block"] or state not in entry["ckpt_offset"]:
        return None
    return (entry["fixed"]["lora+stem"] + layers * entry["stem_layer"]["lora+stem"] + blocks * entry["block"][state]
            + entry["ckpt_offset"][state])


def measure_points(points: list[Point], threads: int, known: dict[Point, dict] | None = None,
                   max_gib: float | None = None, fresh_process: bool = True) -> dict[Point, dict]:
    """Measure ``points`` one fresh process at a time (``known``: earlier measurements, reused). With
    ``max_gib``, a point whose fitted prediction already exceeds it is not started, and a worker whose RSS
    passes it stops: both become table entries (``"failed"``), as does a worker that died or timed out."""
    results: dict[Point, dict] = {}
    block_floor = {}
    for k, point in enumerate(points, 1):
        if known and point in known:
            results[point] = known[point]
            continue
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
        if max_gib and point.mode == "lora+stem":
            if point.widths not in block_floor:
                block_floor[point.widths] = 4 * _block_params(point.widths) / 2**20
            entry = fit(results, [point.crop], block_floor[point.widths], point.precision)[point.crop]
            expected = fitted_peak_mb(entry, point.layers, point.blocks, point.checkpointing)
            if expected is not None and expected / 1024 > max_gib:
                log(f"[{k}/{len(points)}] {point}: skipped, fitted {expected / 1024:.1f} GiB > {max_gib} GiB")
                results[point] = {"failed": f"not run: fitted {expected / 1024:.1f} GiB > budget {max_gib:g} GiB",
                                  "measured": when}
                continue
        log(f"[{k}/{len(points)}] {point}")
        if not fresh_process:
            results[point] = {**measure(point), "measured": when}
            continue
        try:
            results[point] = {**run_worker("benchmarks.bench_memory_plan",
                                           {"point": asdict(point), "threads": threads, "max_gib": max_gib},
                                           timeout=WORKER_TIMEOUT_S), "measured": when}
        except WorkerFailed as exc:
            reason = (f"over budget: RSS > {max_gib:g} GiB, stopped" if exc.returncode == OVER_BUDGET
                      else exc.summary)
            log(f"failed: {reason}")
            results[point] = {"failed": reason, "measured": when}
        except subprocess.TimeoutExpired:
            log(f"failed: timed out after {WORKER_TIMEOUT_S} s")
            results[point] = {"failed": f"timed out after {WORKER_TIMEOUT_S} s", "measured": when}
    return results


def measured_section(results: dict[Point, dict], max_gib: float | None) -> "Section":
    rows = []
    for p, r in results.items():
        head = [p.crop, p.precision, p.layers, p.blocks, p.mode, "on" if p.checkpointing else "off"]
        if "failed" in r:
            rows.append(head + [r["failed"], "", "", r.get("measured", "")])
        else:
            rows.append(head + [f"{r['peak_mb']:.0f}", f"{r['trainable'] / 1e6:.2f}", f"{r['seconds']:.1f}",
                                r.get("measured", "")])
    budget = (f"; memory budget {max_gib:g} GiB RSS per worker (a point past it is stopped or, when the fit of the "
              "points before it already predicts more, not started)") if max_gib else ""
    return make_section(
        "Measured: one training step (fwd + loss + bwd), ESMFold v1 widths, few layers / blocks, CPU",
        MEASURED_HEADERS, rows,
        ["peak = VmHWM of a fresh process minus its RSS before the model was built: weights + activations + "
         "gradients (no optimizer state; added below as 8 bytes per trainable parameter)",
         "precision bf16 = the step under Lightning's bf16-mixed plugin on CPU (torch.autocast('cpu', bfloat16, "
         "cache_enabled=False) around forward + loss, backward outside it; fp32 weights), as foldtune trains with "
         "trainer.precision: bf16-mixed; the losses switch autocast off themselves" + budget])


def predict_mb(entry: dict, mode: str, checkpointing: bool, layers: int, blocks: int, trainable: int,
               full_block_extra_mb: float = 0.0) -> float:
    """Step peak (MiB) of N layers / M blocks from one crop's fit, AdamW state included."""
    state = "on" if checkpointing else "off"
    block = entry["block"][state] + full_block_extra_mb
    return (entry["fixed"][mode] + entry.get("ckpt_offset", {}).get(state, 0.0) + layers * entry["stem_layer"][mode]
            + blocks * block + 8 * trainable / 2**20)


def all_points(spec: dict[str, tuple], widths: str = "v1") -> list[Point]:
    """Every precision's plan; ``spec``: precision -> (crops, mode_crops, depth_crops)."""
    return [p for precision, (crops, mode_crops, depth_crops) in spec.items()
            for p in plan(crops, widths, precision, mode_crops, depth_crops)]


def run(spec: dict[str, tuple], threads: int, widths: str = "v1", fresh_process: bool = True,
        known: dict[Point, dict] | None = None, max_gib: float | None = None,
        measure_only: bool = False) -> tuple[list, dict]:
    """Measure the plan's points (a fresh process each unless ``fresh_process`` is False: a smoke test;
    ``known``: earlier measurements, reused), fit, extrapolate; returns (markdown sections, the JSON plan)."""
    results = measure_points(all_points(spec, widths), threads, known, max_gib, fresh_process)
    sections = [measured_section(results, max_gib)]
    if measure_only:
        return sections, {}
    more, plan_json = report_sections(results, spec, widths)
    return sections + more, plan_json


def mode_terms(fits: dict[int, dict], crop: int, mode: str) -> tuple[float, float, str] | None:
    """(rest F, stem layer S, where they come from) of ``mode`` at ``crop`` of one precision's fits.

    Measured at this crop: its own F and S. Otherwise lora+stem's F and S at this crop plus the mode's offset
    from lora+stem at the nearest crop where both were measured (the largest below, else the smallest above):
    the methods differ in the stem (trained or not, adapter factors) and in parameter gradients, terms that the
    crop barely moves (measured fp32 frozen stem vs lora+stem: S -21 / -21 MiB, F -19 / -134 MiB at 128 / 256).
    No crop with the mode: lora+stem's terms. None when lora+stem itself is not fitted at this crop.
    """
    entry = fits[crop]
    if mode in entry["fixed"]:
        return entry["fixed"][mode], entry["stem_layer"][mode], "measured"
    if "lora+stem" not in entry["fixed"]:
        return None
    with_mode = [c for c, e in fits.items() if mode in e["fixed"] and "lora+stem" in e["fixed"]]
    if not with_mode:
        return entry["fixed"]["lora+stem"], entry["stem_layer"]["lora+stem"], "as lora+stem (mode not measured)"
    below = [c for c in with_mode if c < crop]
    ref = max(below) if below else min(with_mode)
    offset_f = fits[ref]["fixed"][mode] - fits[ref]["fixed"]["lora+stem"]
    offset_s = fits[ref]["stem_layer"][mode] - fits[ref]["stem_layer"]["lora+stem"]
    return (entry["fixed"]["lora+stem"] + offset_f, entry["stem_layer"]["lora+stem"] + offset_s,
            f"lora+stem + offset of crop {ref}")


def predict_full_gb(fits: dict[int, dict], crop: int, mode: str, checkpointing: bool, trainable: int, total: int,
                    block_params: int) -> tuple[float, str] | None:
    """Predicted step peak (GB) of the 36-layer / 48-block model, and where the mode's terms come from."""
    entry, state = fits[crop], "on" if checkpointing else "off"
    terms = mode_terms(fits, crop, mode)
    if terms is None or state not in entry["block"] or state not in entry["ckpt_offset"]:
        return None
    fixed, layer, source = terms
    # 'full' also trains the trunk blocks: each holds its gradients (4 B / param; AdamW is in `trainable`)
    extra = 4 * block_params / 2**20 if mode == "full" else 0.0
    mb = predict_mb({**entry, "fixed": {mode: fixed}, "stem_layer": {mode: layer}}, mode, checkpointing,
                    FULL_LAYERS, FULL_BLOCKS, trainable, extra)
    # At the optimizer step weights, every gradient and the AdamW state coexist (activations freed): with few
    # layers the measured peak falls earlier in backward, before most gradients exist. Under bf16 autocast the
    # weights, gradients and AdamW state stay fp32, so the floor is the same.
    return max(mb, (4 * total + 12 * trainable) / 2**20) / 1024, source


def report_sections(results: dict[Point, dict], spec: dict[str, tuple], widths: str = "v1") -> tuple[list, dict]:
    """Per-unit fit per (precision, crop), depth checks, the extrapolated table and its JSON."""
    block_params = _block_params(widths)
    block_weights_mb = 4 * block_params / 2**20
    fits = {precision: fit(results, crops, block_weights_mb, precision) for precision, (crops, _, _) in spec.items()}
    fit_rows, check_notes = [], []
    for precision, by_crop in fits.items():
        for crop, entry in by_crop.items():
            if "estimated" in entry:
                check_notes.append(f"{precision} crop {crop}: {entry['estimated']}; its rows without checkpointing "
                                   "use it (the checkpointed rows do not depend on it)")
            for mode, layer in entry["stem_layer"].items():
                fit_rows.append([crop, precision, mode, f"{layer:.0f}", f"{entry['block'].get('off', float('nan')):.0f}",
                                 f"{entry['block'].get('on', float('nan')):.0f}",
                                 f"{entry['fixed'].get(mode, float('nan')):.0f}",
                                 f"{entry['ckpt_offset'].get('on', float('nan')):.0f}"])
            for layers, blocks, ckpt in ((3, 1, False), (1, 3, False), (1, 3, True)):
                point = Point(crop, layers, blocks, "lora+stem", ckpt, widths=widths, precision=precision)
                if point not in results:
                    continue
                state = "on" if ckpt else "off"
                where = (f"depth check {precision} crop {crop}, {layers} layers / {blocks} blocks (lora+stem, trunk "
                         f"checkpointing {state})")
                if "failed" in results[point]:
                    check_notes.append(f"{where}: not measured ({results[point]['failed']})")
                    continue
                predicted = fitted_peak_mb(entry, layers, blocks, ckpt)
                if predicted is None:
                    continue
                measured = results[point]["peak_mb"]
                check_notes.append(f"{where}: predicted {predicted:.0f} MiB, measured {measured:.0f} MiB "
                                   f"({(predicted - measured) / measured * 100:+.1f} %)")
    check_notes.append(f"a checkpointed block is taken as at least its weights ({block_weights_mb:.0f} MiB) when the "
                       "measured difference is smaller (below the resident-memory noise); checkpointing adds a fixed "
                       "offset (one block recomputed during backward), measured at (1, 1) (last column)")
    sections = [make_section(
        "Per-unit costs (MiB), from the (2,1) - (1,1) and (1,2) - (1,1) differences",
        ["crop", "precision", "method", "stem layer", "trunk block (ckpt off)", "trunk block (ckpt on)", "rest F",
         "ckpt offset"], fit_rows, check_notes)]
    # Extrapolation to 36 layers + 48 blocks.
    counts = {mode: full_size_trainable(mode, widths=widths) for mode in MODES}
    pred_rows = []
    plan_json: dict = {"precisions": {}, "gpu_sizes_gb": list(GPU_SIZES_GB)}
    for precision, by_crop in fits.items():
        table = plan_json["precisions"].setdefault(precision, {})
        for crop in by_crop:
            for mode in MODES:
                for ckpt in (False, True):
                    trainable, total = counts[mode]
                    predicted = predict_full_gb(by_crop, crop, mode, ckpt, trainable, total, block_params)
                    if predicted is None:
                        continue
                    gb, source = predicted
                    fits_in = [f"{size}" for size in GPU_SIZES_GB if gb <= size]
                    pred_rows.append([crop, mode, "on" if ckpt else "off", precision, f"{gb:.1f}",
                                      ", ".join(fits_in) + " GB" if fits_in else "none",
                                      "" if source == "measured" else source])
                    table.setdefault(str(crop), {})[f"{mode}|{'on' if ckpt else 'off'}"] = round(gb, 2)
    sections.append(make_section(
        f"Predicted step peak of ESMFold v1 ({FULL_LAYERS} stem layers + {FULL_BLOCKS} trunk blocks), batch 1",
        ["crop", "method", "trunk checkpointing", "precision", "predicted peak (GB)", "fits", "method terms"],
        pred_rows,
        ["predicted = F + 36 S + 48 T + AdamW state (8 B x trainable parameters of the full model, counted on the "
         "meta device), and at least weights + gradients + AdamW state together (4 B x all + 12 B x trainable "
         "parameters: the optimizer step; this floor decides 'full' with checkpointing); 'full' trains everything "
         "(its trunk blocks also hold gradients: + 4 B x block params); GB = 2^30 bytes; GPU framework overhead "
         "(CUDA context, allocator fragmentation, ~1-3 GB) is not in it",
         "method terms: empty = the method's own F and S measured at that crop and precision; otherwise lora+stem's "
         "F and S at that crop plus the method's offset from lora+stem at the crop named (see bench_memory_plan."
         "mode_terms)",
         "bf16 = CPU autocast (Lightning's bf16-mixed on CPU, what foldtune runs there), a proxy for CUDA: both "
         "cast the matmul-type ops (mm, bmm, matmul, linear, addmm, baddbmm) to bf16, so those activations are "
         "2-byte on both, but the lists of ops autocast keeps in fp32 differ in detail, and CUDA's kernels "
         "(cuBLAS workspaces, fused attention) and caching allocator differ; to be checked with `make bench-gpu`"]))
    return sections, plan_json


def _block_params(widths: str = "v1") -> int:
    from pipeline.models import build_folding_model

    with torch.device("meta"):
        model = build_folding_model({"source": "random", "size": _size(1, 1, widths)})
    return sum(p.numel() for p in model.trunk.blocks[0].parameters())


def _positive_crop(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of residues") from None
    if value < 16:
        raise argparse.ArgumentTypeError(f"{value}: a crop must be at least 16 residues")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".bench" / "memory_plan.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the predicted table (GB) as JSON")
    parser.add_argument("--crops", type=_positive_crop, nargs="+", default=[128, 256], help="fp32 crops")
    parser.add_argument("--bf16-crops", type=_positive_crop, nargs="*", default=[],
                        help="crops measured under bf16 autocast (Lightning's bf16-mixed on CPU)")
    parser.add_argument("--mode-crops", type=_positive_crop, nargs="*", default=None,
                        help="fp32 crops at which the frozen stem and full are measured (default: every crop; "
                             "elsewhere their offset from lora+stem is carried from the nearest measured crop)")
    parser.add_argument("--bf16-mode-crops", type=_positive_crop, nargs="*", default=None,
                        help="the same for bf16 (default: the smallest bf16 crop)")
    parser.add_argument("--depth-crops", type=_positive_crop, nargs="*", default=None,
                        help="fp32 crops with the 3-layer / 3-block depth checks (default: the smallest)")
    parser.add_argument("--bf16-depth-crops", type=_positive_crop, nargs="*", default=None,
                        help="bf16 crops with the depth checks (default: the smallest bf16 crop)")
    parser.add_argument("--max-gib", type=float, default=12.0,
                        help="memory budget per worker, GiB of RSS (default 12; 0: none): a point past it is a "
                             "table entry, not an out-of-memory kill")
    parser.add_argument("--measure-only", action="store_true",
                        help="write only the measured table (for a later --reuse), no fit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse", type=Path, nargs="*", default=[],
                        help="earlier --out files (or docs/benchmarks.md): their measured points are not measured again")
    parser.add_argument("--widths", choices=sorted(WIDTHS), default="v1",
                        help="v1: ESMFold v1 widths (the plan); tiny: a fast smoke test of this script")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    for earlier in args.reuse:
        if not earlier.is_file():
            parser.error(f"--reuse: {earlier}: no such file")
    if args.max_gib < 0:
        parser.error(f"--max-gib: {args.max_gib:g}: must be >= 0 (0: no budget)")
    spec = {"fp32": (sorted(set(args.crops)), args.mode_crops, args.depth_crops)}
    if args.bf16_crops:
        bf16 = sorted(set(args.bf16_crops))
        spec["bf16"] = (bf16, args.bf16_mode_crops if args.bf16_mode_crops is not None else bf16[:1],
                        args.bf16_depth_crops)
    load_before = load_average()
    known: dict[Point, dict] = {}
    for earlier in args.reuse:
        known.update(reuse(earlier, args.widths))
    sections, plan_json = run(spec, args.threads, args.widths, known=known, max_gib=args.max_gib or None,
                              measure_only=args.measure_only)
    text = "\n".join(s.markdown() for s in sections) + "\n" + info_block(
        machine_info(), "python -m benchmarks.bench_memory_plan " + shlex.join(sys.argv[1:] if argv is None else argv),
        load_before, load_average()) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json and not args.measure_only:
        args.json.write_text(json.dumps(plan_json, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
