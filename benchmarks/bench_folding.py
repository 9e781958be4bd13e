"""Folding training-step benchmarks: ESMFold-shaped models (random weights) with LoRTA / LoRA / full.

A step = forward (no recycling) + `pipeline.losses.folding_loss` (FAPE bb+sc, distogram, pLDDT, chi; default
weights) + backward + AdamW step, on real chains from shared/data/structures cropped to `crop` residues.
Adapters go on attn+mlp of both the ESM-2 stem and the folding trunk (`part="all"`), rank 8.

Run alone: `python -m benchmarks.bench_folding [--quick] [--gpu]`; `run_all.py` calls `run(...)`.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.common import REPO_ROOT, bench_main, Section, log, make_section, run_worker, step_memory, time_interleaved

STRUCTURES = REPO_ROOT.parent / "shared" / "data" / "structures"

# `model.size` overrides of pipeline.models (random source). tiny = the project's default tiny config.
SIZES: dict[str, dict] = {
    "tiny": {},
    "medium": {
        "hidden_size": 320, "num_hidden_layers": 6, "num_attention_heads": 20, "intermediate_size": 1280,
        "trunk": {"num_blocks": 4, "sequence_state_dim": 256, "pairwise_state_dim": 64,
                  "sequence_head_width": 32, "pairwise_head_width": 32,
                  "structure_module": {"sequence_dim": 128, "pairwise_dim": 64}},
    },
    # ESMFold v1: ESM-2 3B stem, 48 trunk blocks, seq 1024 / pair 128, structure module 384/128.
    "esmfold_v1": {
        "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 40, "intermediate_size": 10240,
        "trunk": {"num_blocks": 48, "sequence_state_dim": 1024, "pairwise_state_dim": 128,
                  "sequence_head_width": 32, "pairwise_head_width": 32,
                  "structure_module": {"sequence_dim": 384, "pairwise_dim": 128, "ipa_dim": 16,
                                       "resnet_dim": 128, "num_heads_ipa": 12, "num_qk_points": 4,
                                       "num_v_points": 8, "num_blocks": 8}},
    },
}


@dataclass(frozen=True)
class FoldWork:
    size: str = "tiny"
    crop: int = 64
    batch: int = 2
    rank: int = 8
    device: str = "cpu"
    bf16: bool = False
    checkpointing: bool = False
    seed: int = 0
    methods: tuple[str, ...] = field(default=("lorta", "lora", "full"))


def folding_batch(crop: int, batch: int, device: str) -> dict:
    """`batch` real chains (the longest in shared/data/structures first), cropped to `crop` residues."""
    import pandas as pd

    from data.dataset import collate
    from data.structure import read_chain

    manifest = pd.read_csv(STRUCTURES / "MANIFEST.csv")
    manifest = manifest[manifest["kind"] == "experimental"] if "kind" in manifest else manifest
    manifest = manifest.sort_values("n_residues", ascending=False)
    items = []
    for row in manifest.itertuples():
        if len(items) == batch:
            break
        try:
            chain = read_chain(STRUCTURES / Path(row.file).name, chain=row.chain)
        except (ValueError, OSError):
            continue
        window = slice(0, min(crop, len(chain.sequence)))
        n = window.stop
        items.append({
            "aatype": torch.from_numpy(chain.aatype[window].copy()),
            "residue_index": torch.from_numpy(chain.residue_index[window].copy()),
            "mask": torch.ones(n),
            "atom37_positions": torch.from_numpy(chain.atom37_positions[window].copy()),
            "atom37_mask": torch.from_numpy(chain.atom37_mask[window].copy()),
            "chain_id": f"{row.pdb_id}_{row.chain}",
        })
    out = collate(items)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in out.items()}


def build_fold_step(work: FoldWork, method: str):
    """A callable running one training step of the folding model with `method`."""
    import adapters
    from pipeline.losses import folding_loss
    from pipeline.models import build_folding_model

    torch.manual_seed(work.seed)
    model = build_folding_model({"source": "random", "size": SIZES[work.size]})
    if method == "full":
        model.requires_grad_(True)
    else:
        adapters.attach(model, adapters.config_from_dict({
            "method": method, "rank": work.rank, "alpha": 2 * work.rank, "targets": ["attn", "mlp"],
            "part": "all", "dropout": 0.0}))
    if work.checkpointing:
        model.set_grad_checkpointing(True)
    model = model.to(work.device).train()
    batch = folding_batch(work.crop, work.batch, work.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    device_type = torch.device(work.device).type

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=work.bf16):
            outputs = model(input_ids=batch["aatype"], attention_mask=batch["mask"],
                            position_ids=batch["residue_index"], num_recycles=0)
        loss, _ = folding_loss(outputs, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.trainable = sum(p.numel() for p in params)  # type: ignore[attr-defined]
    step.total = sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]
    return step


def measure_memory(work: FoldWork, method: str, steps: int = 2, fresh_process: bool = True) -> dict:
    if fresh_process:
        return run_worker("benchmarks.bench_folding", {
            "work": {**asdict(work), "methods": list(work.methods)}, "method": method, "steps": steps,
            "threads": torch.get_num_threads()})
    step = build_fold_step(work, method)
    return step_memory(step, steps, work.device)


def fold_section(work: FoldWork, warmup: int, repeats: int, fresh_process: bool = True) -> Section:
    steps = {}
    for method in work.methods:
        log(f"building folding model {work.size} + {method}")
        steps[method] = build_fold_step(work, method)
    log(f"timing folding steps: {warmup} warm-up + {repeats} interleaved rounds")
    timings = time_interleaved(steps, warmup, repeats, work.device, progress=log)
    counts = {m: (s.trainable, s.total) for m, s in steps.items()}
    del steps
    memory = {}
    for method in work.methods:
        log(f"peak memory of folding {method} (fresh process)")
        memory[method] = measure_memory(work, method, fresh_process=fresh_process)
    rows = []
    for method in work.methods:
        rows.append([method, counts[method][0], timings.median(method),
                     timings.ratio(method, "full") if "full" in timings.seconds else "",
                     memory[method]["peak_mb"], memory[method]["delta_mb"]])
    title = (f"Folding step — {work.size} ({counts[work.methods[0]][1] / 1e6:.2f} M base params), crop {work.crop}, "
             f"B={work.batch}, rank {work.rank}, adapters attn+mlp on stem+trunk, "
             f"{'bf16 autocast' if work.bf16 else 'fp32'}{', checkpointing' if work.checkpointing else ''} "
             f"on {work.device}")
    return make_section(title, ["method", "trainable params", "median step (s)", "step / full step",
                                "peak (MiB)", "step memory (MiB)"], rows, [
        "loss: pipeline.losses.folding_loss (fape_bb 0.5, fape_sc 0.5, distogram 0.3, plddt 0.01, chi 1.0), "
        "no recycling; chains: the longest experimental chains of shared/data/structures, first `crop` residues",
    ])


def plan(gpu: bool, quick: bool) -> list[FoldWork]:
    if quick:
        return [FoldWork("tiny", crop=32, batch=2)]
    if gpu:
        return [FoldWork("esmfold_v1", crop=256, batch=1, device="cuda", bf16=True, checkpointing=True)]
    return [FoldWork("tiny", crop=64, batch=2), FoldWork("medium", crop=64, batch=2)]


def run(gpu: bool = False, quick: bool = False) -> list[Section]:
    warmup, repeats = (1, 3) if quick else (1, 5)
    return [fold_section(work, warmup, repeats, fresh_process=not quick) for work in plan(gpu, quick)]


def _worker(payload: dict) -> dict:
    torch.set_num_threads(int(payload.get("threads", 2)))
    work_fields = dict(payload["work"])
    work_fields["methods"] = tuple(work_fields["methods"])
    return measure_memory(FoldWork(**work_fields), payload["method"], payload["steps"], fresh_process=False)


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__.splitlines()[0], _worker, lambda args: run(args.gpu, args.quick), argv)


if __name__ == "__main__":
    sys.exit(main())
