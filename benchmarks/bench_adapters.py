"""Adapter training-step benchmarks on fair-esm ESM-2 (random weights, real shapes).

A "step" is forward + masked-LM cross-entropy + backward + AdamW step over the trainable parameters.
Variants (all at the same rank, same base weights, same batch):

    frozen      no adapter; only the 33×d token table (tied to the LM head) trains, so backward still
                runs through every layer — the floor any adapter method pays
    full        every parameter trains
    lora/lorta/tlora  foldtune `adapters.attach` with the given targets
    peft_lora   HF peft LoRA on the fair-esm module names (bench-only dependency)
    lorta_dense foldtune LoRTA factors, but forward the reference way (`benchmarks.lorta_dense`)

Run alone: `python -m benchmarks.bench_adapters [--quick] [--gpu]`; `run_all.py` calls `run(...)`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from esm.model.esm2 import ESM2

from adapters.zoo import FAIR_ESM2

from benchmarks.common import (
    Section,
    Timings,
    WorkerFailed,
    bench_main,
    log,
    make_section,
    run_worker,
    step_memory,
    time_interleaved,
    verdict,
)

# (layers, embed dim, heads) of the released ESM-2 checkpoints (adapters.zoo's table, short names) + a tiny
# shape for smoke tests; weights are random here.
ESM2_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 4), **{name.removesuffix("_UR50D"): shape for name, shape in FAIR_ESM2.items()}}
PEFT_TARGETS = {"attn": ["q_proj", "k_proj", "v_proj", "out_proj"], "mlp": ["fc1", "fc2"]}
FOLDTUNE_METHODS = ("lora", "lorta", "tlora")


@dataclass(frozen=True)
class Variant:
    """One way of training the same base model."""

    method: str                     # frozen | full | lora | lorta | tlora | peft_lora | lorta_dense
    targets: tuple[str, ...] = ("attn",)

    @property
    def label(self) -> str:
        if self.method in ("frozen", "full"):
            return self.method
        return f"{self.method} {'+'.join(self.targets)}"


@dataclass(frozen=True)
class Workload:
    """Model shape, batch and numerics shared by the variants of one comparison."""

    shape: str = "esm2_t12_35M"
    batch: int = 8
    length: int = 256               # tokens per sequence including <cls>/<eos>
    rank: int = 8
    device: str = "cpu"
    autocast_bf16: bool = False     # GPU runs: bf16 autocast, fp32 master weights
    seed: int = 0

    @property
    def dims(self) -> tuple[int, int, int]:
        return ESM2_SHAPES[self.shape]


# --------------------------------------------------------------------------------------------- building
def build_esm2(shape: str, seed: int = 0) -> ESM2:
    """Randomly initialised fair-esm ESM-2 with the layer count / width / heads of `shape`."""
    layers, dim, heads = ESM2_SHAPES[shape]
    torch.manual_seed(seed)
    return ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet="ESM-1b")


def mlm_batch(model: ESM2, batch: int, length: int, seed: int = 0, mask_fraction: float = 0.15
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random protein tokens with <cls>/<eos>, `mask_fraction` of residues replaced by <mask>.

    Returns tokens (B, length) long and labels (B, length) long (-100 = not scored).
    """
    alphabet = model.alphabet
    generator = torch.Generator().manual_seed(seed)
    residue_ids = torch.tensor([alphabet.get_idx(a) for a in "ACDEFGHIKLMNPQRSTVWY"])
    body = residue_ids[torch.randint(0, 20, (batch, length - 2), generator=generator)]
    tokens = torch.cat([
        torch.full((batch, 1), alphabet.cls_idx), body, torch.full((batch, 1), alphabet.eos_idx)], dim=1)
    labels = torch.full_like(tokens, -100)
    masked = torch.rand(batch, length - 2, generator=generator) < mask_fraction
    masked[:, 0] = True  # at least one scored position per row
    labels[:, 1:-1][masked] = body[masked]
    tokens[:, 1:-1][masked] = alphabet.mask_idx
    return tokens, labels


def foldtune_config(method: str, rank: int, targets: tuple[str, ...]):
    import adapters

    return adapters.config_from_dict(
        {"method": method, "rank": rank, "alpha": 2 * rank, "targets": list(targets), "dropout": 0.0})


def apply_variant(model: ESM2, variant: Variant, rank: int) -> ESM2:
    """Set trainable parameters / attach adapters in place; returns the model."""
    method = variant.method
    if method == "full":
        model.requires_grad_(True)
    elif method == "frozen":
        model.requires_grad_(False)
        model.embed_tokens.weight.requires_grad_(True)
    elif method in FOLDTUNE_METHODS or method == "lorta_dense":
        import adapters

        base = "lorta" if method == "lorta_dense" else method
        adapters.attach(model, foldtune_config(base, rank, variant.targets))
        if method == "lorta_dense":
            from benchmarks.lorta_dense import DenseDeltaLoRTA

            model._bench_dense = DenseDeltaLoRTA(model)  # type: ignore[attr-defined]
            model._bench_dense.install()
    elif method == "peft_lora":
        import peft

        names = [name for t in variant.targets for name in PEFT_TARGETS[t]]
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=names, lora_dropout=0.0, bias="none")
        model = peft.inject_adapter_in_model(config, model)
    else:
        raise ValueError(f"variant.method: {method!r}: unknown")
    return model


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomize_trainable(model: torch.nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Give every trainable tensor random values so that ΔW ≠ 0 (zero-initialised B would hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


class TrainStep:
    """forward + masked-LM loss + backward + AdamW step; call it to run one step."""

    def __init__(self, model: ESM2, work: Workload) -> None:
        self.model = model.to(work.device).train()
        self.work = work
        tokens, labels = mlm_batch(model, work.batch, work.length, work.seed)
        self.tokens, self.labels = tokens.to(work.device), labels.to(work.device)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.last_loss = float("nan")

    def __call__(self) -> None:
        with torch.autocast(torch.device(self.work.device).type, dtype=torch.bfloat16,
                            enabled=self.work.autocast_bf16):
            logits = self.model(self.tokens)["logits"]
        loss = F.cross_entropy(logits.float().flatten(0, 1), self.labels.flatten(), ignore_index=-100)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()


class InferStep:
    """One inference forward (no autograd)."""

    def __init__(self, model: ESM2, work: Workload) -> None:
        self.model = model.to(work.device).eval()
        self.work = work
        self.tokens = mlm_batch(model, work.batch, work.length, work.seed)[0].to(work.device)

    @torch.inference_mode()
    def __call__(self) -> torch.Tensor:
        with torch.autocast(torch.device(self.work.device).type, dtype=torch.bfloat16,
                            enabled=self.work.autocast_bf16):
            return self.model(self.tokens)["logits"]


def build_train_step(work: Workload, variant: Variant) -> TrainStep:
    model = apply_variant(build_esm2(work.shape, work.seed), variant, work.rank)
    return TrainStep(model, work)


# --------------------------------------------------------------------------------------------- memory
def measure_train_memory(work: Workload, variant: Variant, steps: int = 2, fresh_process: bool = True) -> dict:
    """Peak memory of `steps` training steps (the first one allocates grads and AdamW state).

    CPU: one fresh process per variant (VmHWM is per process). Returns dict(peak_mb, delta_mb).
    """
    if fresh_process:
        return run_worker("benchmarks.bench_adapters", {
            "job": "train_memory", "work": asdict(work), "variant": asdict(variant), "steps": steps,
            "threads": torch.get_num_threads()})
    step = build_train_step(work, variant)
    return step_memory(step, steps, work.device)


def _worker(payload: dict) -> dict:
    torch.set_num_threads(int(payload.get("threads", 2)))
    if payload["job"] == "train_memory":
        work = Workload(**payload["work"])
        variant = Variant(payload["variant"]["method"], tuple(payload["variant"]["targets"]))
        return measure_train_memory(work, variant, payload["steps"], fresh_process=False)
    raise ValueError(f"worker payload: job: {payload['job']!r}: unknown")


# --------------------------------------------------------------------------------------------- tables
@dataclass
class StepResult:
    timings: Timings
    trainable: dict[str, int]
    memory: dict[str, dict]


def compare_train_steps(work: Workload, variants: list[Variant], warmup: int, repeats: int,
                        measure_memory: bool = True, fresh_process: bool = True) -> StepResult:
    """Interleaved step timing of all `variants` in this process, then peak memory per variant."""
    steps: dict[str, TrainStep] = {}
    for variant in variants:
        log(f"building {variant.label} on {work.shape}")
        steps[variant.label] = build_train_step(work, variant)
    trainable = {label: trainable_count(step.model) for label, step in steps.items()}
    log(f"timing {len(steps)} variants: {warmup} warm-up + {repeats} interleaved rounds")
    timings = time_interleaved(dict(steps), warmup, repeats, work.device, progress=log)
    del steps
    memory: dict[str, dict] = {}
    if measure_memory:
        for variant in variants:
            log(f"peak memory of {variant.label}{' (fresh process)' if fresh_process else ''}")
            memory[variant.label] = measure_train_memory(work, variant, fresh_process=fresh_process)
    return StepResult(timings, trainable, memory)


def method_variants() -> list[Variant]:
    return [
        Variant("frozen"),
        Variant("full"),
        Variant("lora", ("attn",)),
        Variant("peft_lora", ("attn",)),
        Variant("lorta", ("attn",)),
        Variant("lora", ("attn", "mlp")),
        Variant("peft_lora", ("attn", "mlp")),
        Variant("lorta", ("attn", "mlp")),
        Variant("tlora", ("attn", "mlp")),
    ]


def step_goal_rows(t: Timings) -> list[list[object]]:
    """LoRTA / LoRA and foldtune LoRA / peft LoRA step-time ratios against their goals."""
    rows: list[list[object]] = []
    pairs = [(f"LoRTA / LoRA step ({g})", f"lorta {g}", f"lora {g}", 1.05) for g in ("attn", "attn+mlp")]
    pairs += [(f"foldtune LoRA / peft LoRA step ({g})", f"lora {g}", f"peft_lora {g}", 1.00) for g in ("attn", "attn+mlp")]
    for name, a, b, target in pairs:
        value = t.ratio(a, b)
        rows.append([name, value, f"<= {target}", verdict(value, "<=", target), f"{100 * t.spread(a):.0f}% / "
                     f"{100 * t.spread(b):.0f}%"])
    return rows


def ratio_sections(work: Workload, warmup: int, repeats: int, fresh_process: bool = True) -> list[Section]:
    """Only the step-time goal pairs (6 variants, no memory): short steps, many rounds, for a busy machine."""
    variants = [Variant(m, t) for t in (("attn",), ("attn", "mlp")) for m in ("lora", "peft_lora", "lorta")]
    t = compare_train_steps(work, variants, warmup, repeats, measure_memory=False).timings
    return [make_section(
        f"Step-time goal ratios, goal pairs only — {work.shape}, B={work.batch}, L={work.length}, {repeats} rounds",
        ["ratio", "measured", "goal", "verdict", "spread A / B"], step_goal_rows(t),
        ["median step (s): " + ", ".join(f"{k} {t.median(k):.3g}" for k in t.seconds)])]


def _safe_ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def step_sections(work: Workload, warmup: int, repeats: int, fresh_process: bool = True) -> list[Section]:
    """Per-method table plus the goal ratios (LoRTA/LoRA, foldtune/peft, memory vs full).

    `fresh_process=False` (quick mode) measures memory in this process: fast, but only indicative.
    """
    result = compare_train_steps(work, method_variants(), warmup, repeats, fresh_process=fresh_process)
    t, mem = result.timings, result.memory
    base = t.median("frozen")
    headers = ["variant", "trainable params", "median step (s)", "spread (±)", "× frozen", "peak RSS/alloc (MiB)",
               "step memory (MiB)"]
    rows = []
    for label in t.seconds:
        m = mem.get(label, {})
        rows.append([label, result.trainable[label], t.median(label), f"{100 * t.spread(label):.1f}%",
                     t.median(label) / base, m.get("peak_mb", float("nan")), m.get("delta_mb", float("nan"))])
    layers, dim, heads = work.dims
    shape_text = (f"{work.shape} shape ({layers} layers, d {dim}, {heads} heads), B={work.batch}, "
                  f"L={work.length}, rank {work.rank}, alpha {2 * work.rank}, dropout 0, AdamW, "
                  f"{'bf16 autocast' if work.autocast_bf16 else 'fp32'} on {work.device}")
    per_method = make_section(f"Training step per method — {shape_text}", headers, rows, [
        "median step = forward + masked-LM cross-entropy + backward + AdamW step; medians of interleaved rounds",
        "step memory = peak during 2 steps minus resident memory before them (grads, AdamW state, activations); "
        "peak = whole-process high-water mark (CPU: VmHWM of a fresh process; GPU: max_memory_allocated)",
    ])

    goal_rows = step_goal_rows(t)
    ratio_rows = []
    if mem:
        for label in ("lora attn+mlp", "lorta attn+mlp", "tlora attn+mlp", "lora attn", "lorta attn", "frozen"):
            ratio_rows.append([f"{label} / full", _safe_ratio(mem[label]["peak_mb"], mem["full"]["peak_mb"]),
                               _safe_ratio(mem[label]["delta_mb"], mem["full"]["delta_mb"])])
    goals = make_section(f"Step-time goals — {work.shape}, B={work.batch}, L={work.length}",
                         ["ratio", "measured", "goal", "verdict", "spread A / B"], goal_rows,
                         ["ratios are medians over interleaved rounds of t_A/t_B from the same round"])
    memory = make_section(f"Peak memory: adapter / full fine-tuning — {work.shape}, B={work.batch}, L={work.length}",
                          ["ratio", "peak (whole process)", "step memory"], ratio_rows,
                          ["no numeric goal in the issue; reported for the record"])
    return [per_method, goals, memory]


def dense_sections(work: Workload, warmup: int, repeats: int, fresh_process: bool = True) -> list[Section]:
    """Reference-style dense-ΔW LoRTA forward vs foldtune's factorised LoRTA: Q,K,V,O (M=4) and + MLP (M=12)."""
    from benchmarks.lorta_dense import DenseDeltaLoRTA

    layers, dim, heads = work.dims
    rows = []
    for targets in (("attn",), ("attn", "mlp")):
        group = "+".join(targets)
        log(f"building LoRTA {group} on {work.shape} (dense reference shares the same model)")
        model = apply_variant(build_esm2(work.shape, work.seed), Variant("lorta", targets), work.rank)
        step = TrainStep(model, work)
        dense = DenseDeltaLoRTA(model)
        n_types = len(dense.factors[0].types)  # M: 4 for Q,K,V,O, 12 with the MLP slices

        def dense_step() -> None:
            with dense:
                step()

        timings = time_interleaved({"foldtune": step, "dense": dense_step}, warmup, repeats, work.device,
                                   progress=log)
        del step, model, dense, dense_step
        memory = {}
        for variant in (Variant("lorta", targets), Variant("lorta_dense", targets)):
            log(f"peak memory of {variant.label} on {work.shape} (fresh process)")
            try:
                memory[variant.method] = measure_train_memory(work, variant, fresh_process=fresh_process)
            except WorkerFailed as error:  # a memory worker that dies (e.g. OOM) is a result, not a crash
                log(f"{variant.label}: {error.summary}")
                memory[variant.method] = {"peak_mb": f"failed: {error.summary}", "delta_mb": "n/a"}
        ratio = timings.ratio("dense", "foldtune")
        rows += [
            [f"foldtune LoRTA (factorised), {group}", layers * n_types, timings.median("foldtune"),
             memory["lorta"]["peak_mb"], memory["lorta"]["delta_mb"], "", "", ""],
            [f"dense-ΔW reference forward, {group}", layers * n_types, timings.median("dense"),
             memory["lorta_dense"]["peak_mb"], memory["lorta_dense"]["delta_mb"], ratio, ">= 2",
             verdict(ratio, ">=", 2.0)],
        ]
    return [make_section(
        f"LoRTA: dense-ΔW reference forward vs foldtune — {work.shape} shape ({layers} layers, d {dim}, "
        f"{heads} heads), rank {work.rank}, B={work.batch}, L={work.length}",
        ["forward", "dense d×d updates / step", "median step (s)", "peak (MiB)", "step memory (MiB)",
         "dense / foldtune", "goal", "verdict"],
        rows,
        ["dense-ΔW = every step builds all L×M dense d×d updates from the CP factors (H small matmuls + cat "
         "each, as the reference `_compute_weights_from_tensor`), then adds x @ ΔWᵀ per adapted layer "
         "(MLP: fc1/fc2 as four d×d slices each, M = 12); written in benchmarks/lorta_dense.py and checked "
         "equal to foldtune's output and gradients in tests/test_bench_smoke.py"],
    )]


def merged_sections(work: Workload, warmup: int, repeats: int, fresh_process: bool = True) -> list[Section]:
    """Inference after adapters.merge vs the plain base model (same weights, same batch)."""
    import adapters

    calls: dict[str, InferStep] = {"base": InferStep(build_esm2(work.shape, work.seed), work)}
    notes = []
    for method in FOLDTUNE_METHODS:
        model = apply_variant(build_esm2(work.shape, work.seed), Variant(method, ("attn", "mlp")), work.rank)
        randomize_trainable(model)
        unmerged = InferStep(model, work)
        before = unmerged().float().clone()
        try:
            adapters.merge(model)
        except Exception as error:  # noqa: BLE001 — a method without merge is a result, not a crash
            notes.append(f"{method}: adapters.merge failed: {type(error).__name__}: {error}")
            continue
        after = InferStep(model, work)
        diff = (after().float() - before).abs().max().item()
        wrappers = sorted({type(m).__name__ for m in model.modules()
                           if type(m).__module__.startswith("adapters")})
        notes.append(f"{method}: max |logits merged − unmerged| = {diff:.2e}; adapter module types left in the "
                     f"merged model: {', '.join(wrappers) or 'none'}")
        calls[f"{method} merged"] = after
    log(f"timing merged inference of {len(calls)} variants")
    timings = time_interleaved(dict(calls), warmup, repeats, work.device, progress=log)
    rows = [["base", timings.median("base"), "", "", ""]]
    for label in list(calls)[1:]:
        ratio = timings.ratio(label, "base")
        rows.append([label, timings.median(label), ratio, "<= 1.01", verdict(ratio, "<=", 1.01)])
    return [make_section(
        f"Merged inference vs base — {work.shape}, B={work.batch}, L={work.length}, adapters on attn+mlp",
        ["model", "median forward (s)", "merged / base", "goal", "verdict"], rows, notes)]


# --------------------------------------------------------------------------------------------- entry
def workloads(gpu: bool, quick: bool, reduced: bool = False) -> dict[str, list[Workload]]:
    """Which shapes each table runs on (`reduced`: CPU shapes with half the tokens, for a busy machine)."""
    if quick:
        tiny = Workload("tiny", batch=2, length=32, rank=4)
        return {"steps": [tiny], "dense": [tiny], "merged": [tiny], "ratios": [tiny]}
    if gpu:
        kw = dict(device="cuda", autocast_bf16=True)
        return {
            "steps": [Workload("esm2_t33_650M", batch=8, length=512, **kw),
                      Workload("esm2_t36_3B", batch=4, length=512, **kw)],
            "dense": [Workload("esm2_t33_650M", batch=8, length=512, **kw)],
            "merged": [Workload("esm2_t33_650M", batch=8, length=512, **kw)],
            "ratios": [Workload("esm2_t33_650M", batch=2, length=512, **kw)],
        }
    batch = 4 if reduced else 8
    return {
        "steps": [Workload("esm2_t12_35M", batch=batch, length=256)],
        "dense": [Workload("esm2_t33_650M", batch=batch // 4, length=128)],
        # reduced: short forwards and many rounds, so a 1 % goal is not lost in the noise of a busy machine
        "merged": [Workload("esm2_t12_35M", batch=1 if reduced else batch, length=256)],
        "ratios": [Workload("esm2_t12_35M", batch=1, length=256)],
    }


def run(gpu: bool = False, quick: bool = False, only: tuple[str, ...] = ("steps", "ratios", "dense", "merged"),
        reduced: bool = False) -> list[Section]:
    plan = workloads(gpu, quick, reduced)
    # interleaved rounds per table; forwards are cheap and the merged goal is 1 %, so it gets many more
    rounds = ({"steps": 2, "dense": 2, "merged": 3, "ratios": 2} if quick else
              {"steps": 3, "dense": 5, "merged": 30, "ratios": 15} if reduced else
              {"steps": 5, "dense": 5, "merged": 12, "ratios": 15})
    sections: list[Section] = []
    builders: dict[str, Callable[..., list[Section]]] = {
        "steps": step_sections, "dense": dense_sections, "merged": merged_sections, "ratios": ratio_sections}
    for table in only:
        for work in plan[table]:
            sections += builders[table](work, 1, rounds[table], fresh_process=not quick)
    return sections


def main(argv: list[str] | None = None) -> int:
    def add_tables(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--only", nargs="+", default=["steps", "dense", "merged"],
                            choices=["steps", "dense", "merged", "ratios"])

    return bench_main(__doc__.splitlines()[0], _worker,
                      lambda args: run(args.gpu, args.quick, tuple(args.only)), argv, add_tables)


if __name__ == "__main__":
    sys.exit(main())
