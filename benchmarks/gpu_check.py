"""One-command GPU check: ESMFold v1 training steps against the memory plan, predict throughput, adapter ratios.

    python benchmarks/gpu_check.py [--out docs/gpu_check.md]      # a CUDA machine (`make bench-gpu`), ~5-8 min
    python benchmarks/gpu_check.py --tiny --out FILE              # tiny shapes on CPU: checks the script works

On CUDA (ESMFold v1 shapes: 36 stem layers at 2560, 48 blocks, random weights; bf16 autocast, batch 1):

1. LoRTA and LoRA training steps (adapters on stem + trunk, rank 8, AdamW) at crop 256 with trunk
   checkpointing: median step time and peak allocated memory, next to the CPU-measured memory plan's
   prediction (pipeline/memory_plan.json, its bf16 rows: CPU autocast, the proxy this checks on CUDA);
2. the full fine-tuning step, if the plan says it fits the device;
3. prediction throughput (residues / s, no recycling) at a few lengths, trunk chunking off and on (64);
4. the adapter step ratios table of `make bench` at the ESM-2 650M / 3B shapes (benchmarks/bench_adapters.py).

`--tiny` runs the same code on the project's tiny shapes on the CPU (crop 32, fp32): the numbers mean nothing,
it shows the script runs (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    PeakMemory, Section, info_block, load_average, log, machine_info, make_section, synchronize,
)


def _plan_gb(method: str, crop: int, checkpointing: bool) -> float | None:
    from pipeline.memory_plan import load_plan

    plan = load_plan()
    # these steps run under bf16 autocast: the plan's bf16 row (CPU autocast, the proxy this check tests)
    row = (plan or {}).get("precisions", {}).get("bf16", {}).get(str(crop), {})
    return row.get(f"{method}|{'on' if checkpointing else 'off'}")


def step_table(tiny: bool, device: str, steps: int) -> Section:
    from benchmarks import bench_folding
    from benchmarks.bench_folding import FoldWork, build_fold_step

    crop = 32 if tiny else 256
    work = FoldWork("tiny" if tiny else "esmfold_v1", crop=crop, batch=1, device=device, bf16=not tiny,
                    checkpointing=True, methods=("lorta", "lora", "full"))
    if not bench_folding.STRUCTURES.is_dir():
        bench_folding.STRUCTURES = Path("/work/shared/data/structures")
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else None
    rows, notes = [], []
    for method, plan_mode in (("lorta", "lorta+stem"), ("lora", "lora+stem"), ("full", "full")):
        predicted = None if tiny else _plan_gb(plan_mode, crop, True)
        if method == "full" and total_gb is not None and predicted is not None and predicted > total_gb:
            notes.append(f"full: not run, the plan predicts {predicted:.1f} GB > {total_gb:.0f} GB on this device")
            continue
        log(f"step: {method}")
        try:
            step = build_fold_step(work, method)
            step()  # warm-up (also allocates the optimizer state)
            times = []
            with PeakMemory(device) as memory:
                for _ in range(steps):
                    synchronize(device)
                    start = time.perf_counter()
                    step()
                    synchronize(device)
                    times.append(time.perf_counter() - start)
        except torch.cuda.OutOfMemoryError as exc:  # a table entry, not a crash
            notes.append(f"{method}: out of memory ({str(exc).splitlines()[0][:120]})")
            continue
        peak_gb = memory.peak_mb / 1024
        rows.append([method, f"{step.trainable:,}", f"{statistics.median(times):.3f}", f"{peak_gb:.2f}",
                     "" if predicted is None else f"{predicted:.1f}",
                     "" if predicted is None else f"{peak_gb / predicted:.2f}"])
        del step
        if device == "cuda":
            torch.cuda.empty_cache()
    shape = "tiny" if tiny else "ESMFold v1 (36 x 2560 stem, 48 blocks)"
    notes.append("peak: torch.cuda.max_memory_allocated on CUDA (CUDA context not included), VmHWM on CPU; "
                 "predicted: pipeline/memory_plan.json, bf16 (CPU autocast), trunk checkpointing on")
    return make_section(f"Training step — {shape}, crop {crop}, batch 1, {'fp32' if tiny else 'bf16 autocast'}, "
                        f"trunk checkpointing, adapters on stem + trunk (rank 8), {device}",
                        ["method", "trainable params", "median step (s)", "peak (GB)", "plan (GB)", "peak / plan"],
                        rows, notes)


def predict_table(tiny: bool, device: str, repeats: int) -> Section:
    from benchmarks.bench_folding import SIZES
    from pipeline.models import build_folding_model

    model = build_folding_model({"source": "random", "size": SIZES["tiny" if tiny else "esmfold_v1"]}).to(device).eval()
    lengths = (16, 32) if tiny else (128, 256, 512)
    rows = []
    for length in lengths:
        aatype = torch.randint(0, 20, (1, length), device=device)
        mask = torch.ones(1, length, device=device)
        cells = [length]
        for chunk in (None, 64):
            model.trunk.set_chunk_size(chunk)
            with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=not tiny):
                model(input_ids=aatype, attention_mask=mask, num_recycles=0)  # warm-up
                synchronize(device)
                start = time.perf_counter()
                for _ in range(repeats):
                    model(input_ids=aatype, attention_mask=mask, num_recycles=0)
                synchronize(device)
            cells.append(f"{length * repeats / (time.perf_counter() - start):.0f}")
        rows.append(cells)
    model.trunk.set_chunk_size(None)
    return make_section(f"Prediction throughput (residues / s, batch 1, no recycling) — {'tiny' if tiny else 'ESMFold v1'}"
                        f", {device}", ["length", "trunk chunking off", "trunk chunk 64"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks the script, fast)")
    parser.add_argument("--out", type=Path, default=None, help="markdown output (default docs/gpu_check.md on CUDA)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny on a CPU machine")
    device = "cpu" if args.tiny else "cuda"
    out = args.out or Path(__file__).resolve().parents[1] / ("docs/gpu_check.md" if not args.tiny else ".bench/gpu_check_tiny.md")
    load_before = load_average()
    start = time.perf_counter()
    sections = [step_table(args.tiny, device, args.steps), predict_table(args.tiny, device, args.steps)]
    if args.tiny:
        sections.append(Section("Adapter step ratios at ESM-2 650M / 3B shapes", "skipped with --tiny (GPU shapes)"))
    else:
        from benchmarks import bench_adapters

        sections += bench_adapters.run(gpu=True, only=("ratios",))
    text = "# GPU check (benchmarks/gpu_check.py)\n\n" + "\n".join(s.markdown() for s in sections) + "\n" + info_block(
        machine_info(device), "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        load_before, load_average()) + f"\n- wall time: {time.perf_counter() - start:.0f} s\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
