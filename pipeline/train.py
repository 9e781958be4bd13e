"""Training: Lightning modules for folding (`kind: fold`) and masked-LM (`kind: lm`) fine-tuning, the
step-indexed data pipeline that makes `--resume` exact, and the run directory (docs/design.md).

`train(cfg, resume=False) -> TrainResult` runs one resolved config (`pipeline.config`).

Exactness of resume: every random choice of a step is a function of (seed, step) -- the batch (epoch
permutation + crop via `FoldingDataset`'s (seed, epoch, index) crops), the number of recycles and the
LM masking -- and the checkpoint holds the trainable parameters, optimizer, scheduler, global RNG states
and the count of consumed batches. On CPU a run stopped after N steps and resumed to M gives the same
adapter bit for bit as an uninterrupted M-step run, also under DDP (`trainer.devices: N`, gloo on CPU) and
gradient accumulation; docs/training.md, "Several processes", says what every rank decides alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import resource
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from data.io import atomic_path, atomic_write_text
from pipeline.config import dump_config, flatten

log = logging.getLogger("foldtune.train")

_CA = 1  # CA index in atom37 and atom14


class NonFiniteLossAbort(RuntimeError):
    """Training stopped after `trainer.max_bad_steps` consecutive non-finite losses."""


# ------------------------------------------------------------------------------------------- data

class StepBatchSampler(torch.utils.data.Sampler):
    """An endless stream of batches where batch k depends only on (seed, k).

    Each epoch is a permutation of the items (or `TokenBudgetBatchSampler`'s length buckets when
    `max_tokens` is set), cut into batches; items are yielded as `(epoch, index)` so the dataset
    crops with the right epoch. `start` skips already consumed batches (resume). Under DDP rank r
    takes global batches r, r + W, r + 2W, ...
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, max_tokens: int | None = None,
                 start: int = 0, rank: int = 0, world_size: int = 1):
        if not lengths:
            raise ValueError("data: the training split is empty")
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.max_tokens = batch_size, seed, max_tokens
        self.start, self.rank, self.world_size = start, rank, world_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self.max_tokens is not None:
            from data.dataset import TokenBudgetBatchSampler

            sampler = TokenBudgetBatchSampler(self.lengths, self.max_tokens, shuffle=True, seed=self.seed,
                                              max_batch_size=self.batch_size)
            sampler.set_epoch(epoch)
            return sampler.batches()
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths)).tolist()
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def global_batches(self) -> Iterator[list[tuple[int, int]]]:
        epoch = 0
        while True:
            for batch in self.epoch_batches(epoch):
                yield [(epoch, index) for index in batch]
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for k, batch in enumerate(self.global_batches()):
            local = k - self.rank
            if local < 0 or local % self.world_size:
                continue
            if local // self.world_size >= self.start:
                yield batch


class ShardBatchSampler(torch.utils.data.Sampler):
    """Validation under DDP: rank r of W scores items r, r + W, ... in order, in batches of `batch_size`.
    A rank left without items (fewer items than ranks) scores item r mod n again, so every rank runs the
    validation loop; `gather_val_records` counts that chain once."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1):
        indices = list(range(rank, n, world_size)) or [rank % n]
        self.batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


class EpochIndexed(torch.utils.data.Dataset):
    """`dataset[(epoch, index)]` -> `dataset.set_epoch(epoch); dataset[index]` (crops depend on the epoch)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


def read_split(splits_csv: str | os.PathLike, split: str) -> list[str]:
    path = Path(splits_csv)
    if not path.is_file():
        raise ValueError(f"{path}: splits: file not found (run `foldtune split`)")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in ("chain_id", "split"):
        if column not in frame.columns:
            raise ValueError(f"{path}: {column}: column missing")
    return frame.loc[frame["split"] == split, "chain_id"].tolist()


# Which chains a run trained on and monitored: provenance, and how a later run checks that its base never saw
# the chains it fine-tunes or validates on.
CHAINS_FILE = "chains.json"


def run_chains(cfg: dict) -> dict[str, list[str]]:
    """{"train": chain ids trained on, "val": chain ids validated on} of a resolved config."""
    data = cfg["data"]
    return {role: sorted(read_split(data["splits"], data[f"{role}_split"]))
            if data.get("splits") and data.get(f"{role}_split") else [] for role in ("train", "val")}


def check_base_is_disjoint(base_run: str | os.PathLike, chains: dict[str, list[str]]) -> None:
    """ValueError when the base run (model.base_run) was trained on a chain this run trains or validates on:
    its gains would be memory, not adaptation. Bases without a record (older runs) are not checked."""
    record = Path(base_run) / CHAINS_FILE
    if not record.is_file():
        return
    try:
        base_train = set(json.loads(record.read_text(encoding="utf-8"))["train"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{record}: cannot read the base's training chains ({exc})") from exc
    for role, ids in chains.items():
        shared = sorted(base_train.intersection(ids))
        if shared:
            raise ValueError(f"model.base_run: {base_run} was trained on {len(shared)} of this run's {role} chains "
                             f"({', '.join(shared[:5])}{' ...' if len(shared) > 5 else ''}); use a split whose "
                             f"{role} chains the base never saw")


# ------------------------------------------------------------------------------- adapters glue

def _adapter_dict(adapter_cfg: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in adapter_cfg.items()}


def base_source(model_cfg: dict, kind: str = "fold") -> dict:
    """Where a run's base comes from, as recorded in its adapter: the `model:` keys that build it."""
    keep = {k: v for k, v in model_cfg.items() if k != "train_heads" and v not in (None, {}, [], "")}
    if keep.get("base_run"):
        keep["base_run"] = str(Path(keep["base_run"]).resolve())
    return {"kind": kind, **keep}


def attach_method(model: torch.nn.Module, adapter_cfg: dict, train_heads: bool = False, seed: int = 0,
                  base: dict | None = None) -> None:
    """Attach the configured method (adapters.attach freezes the base first); optionally unfreeze the
    folding heads + structure module, which `adapters.save` then stores next to the adapter.

    TLoRA's frozen random matrices are drawn from `seed` (the run's trainer.seed, recorded in the adapter
    config), so every seed of a grid gets its own projections. `base`: recorded as the adapter's base source.
    """
    import adapters

    adapter = _adapter_dict(adapter_cfg)
    if adapter["method"] == "tlora":
        adapter.setdefault("seed", int(seed))
    adapters.attach(model, adapters.config_from_dict(adapter), base_source=base)
    if train_heads:  # with method `none` this is the head-only control: no adapter, the head trains
        from pipeline.models import head_parameters

        for param in head_parameters(model).values():
            param.requires_grad_(True)


def trainable_head_params(model: torch.nn.Module) -> int:
    """Trainable parameters of the folding head (`model.train_heads`); the rest of a run's trainable
    parameters are its method's own (the adapter, or the weights `full` trains)."""
    from pipeline.models import head_parameters

    return sum(p.numel() for p in head_parameters(model).values() if p.requires_grad)


def save_trained(model: torch.nn.Module, out_dir: str | os.PathLike) -> None:
    """RUN/adapter: adapters.save layout (adapter params + every other trainable param, e.g. heads)."""
    import adapters

    adapters.save(model, out_dir)


def load_trained(model: torch.nn.Module, adapter_dir: str | os.PathLike, base: dict | None = None,
                 force: bool = False, keep_base: bool = False) -> dict:
    """Attach + load a run's adapter directory into a freshly built base; returns the adapter config.

    `base`: this model's base source (named if the adapter's recorded base differs; `force` loads anyway)."""
    import adapters

    adapter_dir = Path(adapter_dir)
    adapters.load(model, adapter_dir, base_source=base, force=force, keep_base=keep_base)
    return adapters.read_config(adapter_dir)


def load_base_run(model: torch.nn.Module, run_dir: str | os.PathLike) -> None:
    """`model.base_run`: copy the plain weights a method=full run trained into `model` (nothing attached,
    so the run's own adapter can be attached afterwards)."""
    import adapters

    adapter_dir = Path(run_dir) / "adapter"
    try:
        saved = adapters.read_config(adapter_dir)
    except ValueError as exc:
        raise ValueError(f"model.base_run: {exc}") from exc
    if saved["method"] not in ("full", "none"):
        raise ValueError(f"model.base_run: {run_dir} was trained with method={saved['method']}; only "
                         "method=full (or none) runs hold plain base weights")
    weights = adapter_dir / adapters.WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"model.base_run: {weights}: not found")
    tensors = load_file(str(weights))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"model.base_run: {weights}: {name}: does not fit the configured model "
                                 f"(model section differs from the base run's?)")
            if params[name].device.type != "meta":
                params[name].copy_(value.to(params[name].dtype))


# ------------------------------------------------------------------------------------------ schedule

def lr_lambda(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup over `warmup` steps, then constant or cosine decay to 0 at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------- lightning

class _Task(pl.LightningModule):
    """Shared: optimizer/schedule, NaN guard, trainable-only checkpoints with RNG and data position."""

    def __init__(self, model: torch.nn.Module, cfg: dict, base_names: set[str]):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.base_names = base_names
        self.strict_loading = False  # checkpoints hold only the trainable parameters
        self.batches_seen = 0
        self.bad_steps = 0
        self.aborted = False
        self.best_val_tm = float("nan")
        self.last_train_loss = float("nan")
        self.train_seconds_before = 0.0
        self.val_records: list[dict] = []  # this rank's validation batches, gathered at the epoch's end
        self._good_micro_batches = 0  # finite micro-batches (on every rank) since the last optimizer step
        self._step_chains: list[str] = []  # this rank's chains of the current optimizer step
        # Micro-batches (all ranks) with a non-finite loss + steps with a non-finite gradient, and their chains:
        # the same on every rank, so rank 0's checkpoint holds them for a resume.
        self.nonfinite_batches = 0
        self.nonfinite_chains: set[str] = set()

    # -- randomness per step
    def global_batch(self) -> int:
        """Index of the global batch this rank is about to consume: rank r of W takes r, r + W, ... (the
        sampler's order), so a W-rank run and a 1-rank run with accumulate = W see the same batches."""
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        return self.batches_seen * world + rank

    def step_rng(self, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg["trainer"]["seed"], salt, self.global_batch()])

    def begin_step(self) -> None:
        """Seed torch's global RNG (dropout) from (seed, global batch): the same on any rank count, and a
        resumed run needs no RNG state from the other ranks."""
        torch.manual_seed(int(self.step_rng(0).integers(2**62)))

    def _guard(self, loss: torch.Tensor, chains: Sequence[str] = ()) -> tuple[torch.Tensor, bool]:
        """(loss to backpropagate, finite?). The decision is taken over all ranks (a sum of bad flags): under
        DDP a rank-local skip would hang the gradient all-reduce, and a rank-local abort the next collective.
        A non-finite micro-batch backpropagates a zero that touches every trainable parameter (so DDP sees
        all of them used) and an optimizer step made only of such micro-batches is skipped. `chains`: the
        batch's chain ids, named in the warning (and in summary.json's nonfinite_chains) when it is skipped."""
        chains = list(chains)
        self._step_chains.extend(chains)
        bad_here = not bool(torch.isfinite(loss.detach()))
        flag = torch.tensor(float(bad_here), device=loss.device)
        bad_ranks = int(self.trainer.strategy.reduce(flag, reduce_op="sum").item())  # in place under DDP
        if not bad_ranks:
            self.bad_steps = 0
            self._good_micro_batches += 1
            return loss, True
        self.bad_steps += 1
        limit = self.cfg["trainer"]["max_bad_steps"]
        culprits = self._all_ranks(chains if bad_here else [])  # every rank takes this branch alike
        self.nonfinite_batches += bad_ranks
        self.nonfinite_chains.update(culprits)
        where = f"non-finite loss ({loss.detach().item()})" if bad_here else "non-finite loss on another rank"
        warnings.warn(f"step {self.global_step}: {where}; step skipped on all {self.trainer.world_size} rank(s) "
                      f"({self.bad_steps}/{limit} in a row); chains: {', '.join(culprits) or '?'}",
                      RuntimeWarning, stacklevel=2)
        if self.bad_steps >= limit:
            self.aborted = True
            self.trainer.should_stop = True
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.stack([p.sum() for p in trainable]).sum() * 0.0, False

    def _all_ranks(self, chains: list[str]) -> list[str]:
        """Every rank's `chains` (a collective: call it where all ranks decided alike), in rank order."""
        world = self.trainer.world_size
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * world
            torch.distributed.all_gather_object(parts, list(chains))
            return [chain for part in parts for chain in part]
        return list(chains)

    def configure_optimizers(self):
        tcfg = self.cfg["trainer"]
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("adapter.method: nothing to train (no trainable parameters)")
        optimizer = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
        total = tcfg["max_steps"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, tcfg["warmup_steps"], total, tcfg["schedule"]))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        good, self._good_micro_batches = self._good_micro_batches, 0
        chains, self._step_chains = self._step_chains, []
        if not good:  # every micro-batch of this step was non-finite (on some rank): no update at all
            for p in self.model.parameters():
                p.grad = None
            return
        # A finite loss can still give inf/NaN gradients (fp16 overflow is handled by the scaler): drop them.
        # One fused norm over every gradient (inf/NaN propagate into it) instead of a check per tensor. Under
        # DDP the gradients are already all-reduced, so every rank decides alike.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            suspects = self._all_ranks(chains)  # the gradient is all-reduced: every rank is here alike
            self.nonfinite_batches += 1
            self.nonfinite_chains.update(suspects)
            warnings.warn(f"step {self.global_step}: non-finite gradient; update skipped; chains of the step: "
                          f"{', '.join(suspects) or '?'}", RuntimeWarning)
            for p in self.model.parameters():
                p.grad = None

    # -- validation: each rank scores its shard; the metrics are computed once from all ranks' records
    def val_metrics(self, records: list[dict]) -> dict[str, float]:
        raise NotImplementedError

    def on_validation_epoch_start(self) -> None:
        self.val_records = []

    def on_validation_epoch_end(self) -> None:
        records = gather_val_records(self.val_records, self.trainer.world_size)
        self.val_records = []
        if not records:
            return
        # Identical on every rank (computed from the same gathered records): no further reduction.
        for name, value in self.val_metrics(records).items():
            self.log(name, value, prog_bar=name in ("val_tm_score", "val_nll"), sync_dist=False,
                     rank_zero_only=False)

    # -- checkpoints hold trainable params + our counters + RNG
    def trainable_keys(self) -> set[str]:
        keys = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        keys |= {f"model.{n}" for n in self.model.state_dict() if n not in self.base_names}
        return keys

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["foldtune"] = {
            "batches_seen": self.batches_seen,  # per rank
            "world_size": self.trainer.world_size,
            "bad_steps": self.bad_steps,
            "nonfinite_batches": self.nonfinite_batches,
            "nonfinite_chains": sorted(self.nonfinite_chains),
            "best_val_tm": self.best_val_tm,
            "last_train_loss": self.last_train_loss,
            "train_seconds": self.train_seconds_before + (time.time() - getattr(self, "_fit_started", time.time())),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = self.trainable_keys() - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(f"checkpoint: missing trainable tensors {sorted(missing)[:3]} (config changed since?)")
        state = checkpoint.get("foldtune", {})
        self.batches_seen = state.get("batches_seen", 0)
        saved_world, world = state.get("world_size", 1), self.trainer.world_size
        if saved_world != world:  # the same global batches continue on another number of ranks
            consumed = self.batches_seen * saved_world
            if consumed % world:
                raise ValueError(f"--resume: the checkpoint consumed {consumed} global batches on {saved_world} "
                                 f"rank(s), not a multiple of the {world} rank(s) now; resume on {saved_world}")
            self.batches_seen = consumed // world
        self.bad_steps = state.get("bad_steps", 0)
        self.nonfinite_batches = state.get("nonfinite_batches", 0)
        self.nonfinite_chains = set(state.get("nonfinite_chains", []))
        self.best_val_tm = state.get("best_val_tm", float("nan"))
        self.last_train_loss = state.get("last_train_loss", float("nan"))
        self.train_seconds_before = state.get("train_seconds", 0.0)
        rng = state.get("rng")
        if rng:
            self._pending_rng = rng

    def on_train_start(self) -> None:
        self._fit_started = time.time()
        rng = getattr(self, "_pending_rng", None)
        if rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self._pending_rng = None


def gather_val_records(records: list[dict], world_size: int) -> list[dict]:
    """Every rank's validation records, each chain counted once: a rank whose shard was padded with an
    already scored chain (fewer chains than ranks) contributes that batch only once."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list = [None] * world_size
        torch.distributed.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    seen: set[str] = set()
    kept = []
    for record in records:
        if set(record["chains"]) <= seen:
            continue
        seen.update(record["chains"])
        kept.append(record)
    return kept


class FoldingTask(_Task):
    """Structure fine-tuning: `folding_loss` on cropped chains with sampled recycles; validation
    TM-score and CA-lDDT of the final structure on held-out chains."""

    clamp_fape = True  # FAPE clamped at 10 Å in the next compute_loss; training_step draws it per batch

    def compute_loss(self, batch: dict, num_recycles: int,
                     clamp_fape: bool | None = None) -> tuple[torch.Tensor, dict, Any]:
        """`folding_loss` (fp32 whatever the precision) of one forward; `clamp_fape` (default: the attribute, which
        training_step sets per batch): FAPE clamped at 10 Å."""
        from pipeline.losses import DEFAULT_WEIGHTS, folding_loss

        if clamp_fape is None:
            clamp_fape = self.clamp_fape

        outputs = self.model(batch["aatype"], attention_mask=batch["mask"].long(),
                             position_ids=batch["residue_index"], num_recycles=num_recycles)
        loss_cfg = self.cfg["loss"]
        window = loss_cfg.get("plddt_resolution")
        total, terms = folding_loss(outputs, batch, {k: v for k, v in loss_cfg.items() if k in DEFAULT_WEIGHTS},
                                    fape_clamp_distance=10.0 if clamp_fape else None,
                                    plddt_resolution_range=None if window is None else tuple(window))
        return total, terms, outputs

    def fape_clamped(self) -> bool:
        """Whether the coming training batch clamps FAPE (AF2: 90 % of batches, `loss.fape_clamp_fraction`), drawn
        from (seed, global batch) like the recycles, so a resumed run and any rank count draw alike."""
        return bool(self.step_rng(3).random() < self.cfg["loss"].get("fape_clamp_fraction", 1.0))

    def training_step(self, batch: dict, batch_idx: int):
        low, high = self.cfg["trainer"]["recycles"]
        recycles = int(self.step_rng(1).integers(low, high + 1))
        self.clamp_fape = self.fape_clamped()
        self.begin_step()
        self.batches_seen += 1
        total, terms, _ = self.compute_loss(batch, recycles)
        loss, finite = self._guard(total.float(), batch["chain_id"])
        if not finite:
            return loss
        self.last_train_loss = float(loss.detach())
        size = len(batch["chain_id"])
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=size)
        for name, value in terms.items():
            self.log(f"train_{name}", value.detach().float(), batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        high = self.cfg["trainer"]["recycles"][1]
        self.clamp_fape = True  # validation: always the clamped FAPE (comparable between steps)
        total, _, outputs = self.compute_loss(batch, high)
        quality = structure_quality(outputs.positions[-1][..., _CA, :], batch)
        self.val_records.append({"chains": list(batch["chain_id"]), "loss": float(total.float()),
                                 "per_chain": {"val_tm_score": quality["tm_score"],
                                               "val_lddt_ca": quality["lddt_ca"]}})

    def val_metrics(self, records: list[dict]) -> dict[str, float]:
        """val_loss: mean over batches weighted by their chains; TM-score / CA-lDDT: mean over chains."""
        chains = sum(len(r["chains"]) for r in records)
        metrics = {"val_loss": sum(r["loss"] * len(r["chains"]) for r in records) / chains}
        for name in ("val_tm_score", "val_lddt_ca"):
            metrics[name] = float(np.mean([v for r in records for v in r["per_chain"][name]]))
        return metrics


def structure_quality(pred_ca: torch.Tensor, batch: dict) -> dict[str, list[float]]:
    """Per-chain TM-score (Zhang–Skolnick search) and CA-lDDT of predicted CA (B, L, 3) vs the batch's native."""
    from pipeline.metrics import lddt_ca, tm_score_batch

    ref_ca = batch["atom37_positions"][..., _CA, :]
    mask = (batch["atom37_mask"][..., _CA] * batch["mask"]) > 0.5
    pred = pred_ca.detach().float()
    lddt = lddt_ca(pred, ref_ca.float(), mask.float())
    tm = tm_score_batch(pred.cpu(), ref_ca.float().cpu(), mask.cpu(), l_ref=mask.sum(-1).cpu())
    return {"tm_score": [r["tm_score"] for r in tm], "lddt_ca": [float(v) for v in lddt]}


class LMTask(_Task):
    """Masked-LM fine-tuning of ESM-2; validation perplexity and long-range contact precision."""

    def __init__(self, model, cfg, base_names, val_chains: dict | None = None):
        super().__init__(model, cfg, base_names)
        self.val_chains = val_chains or {}

    def training_step(self, batch: dict, batch_idx: int):
        from pipeline.lm import mask_tokens, masked_lm_loss

        generator = torch.Generator().manual_seed(int(self.step_rng(2).integers(2**62)))
        self.begin_step()
        self.batches_seen += 1
        masked, targets = mask_tokens(batch["tokens"], generator)
        logits = self.model(masked)["logits"]
        loss, _ = masked_lm_loss(logits, targets)
        loss, finite = self._guard(loss, batch["chain_id"])
        if not finite:
            return loss
        self.last_train_loss = float(loss.detach())
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=len(batch["chain_id"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        from pipeline.lm import contact_map, contact_precision, mask_tokens, masked_lm_loss

        # The masking of a batch depends on its chains, not on its position in this rank's shard.
        chains_key = zlib.crc32(",".join(batch["chain_id"]).encode())
        generator = torch.Generator().manual_seed(self.cfg["trainer"]["seed"] * 1000003 + chains_key)
        masked, targets = mask_tokens(batch["tokens"], generator)
        loss, count = masked_lm_loss(self.model(masked)["logits"], targets)
        per_chain: dict[str, list[float]] = {"val_contact_p_at_l": [], "val_contact_p_at_l5": []}
        # Without the release's contact regression the contact head is random: no contact metrics then.
        with_contacts = getattr(self.model, "has_contact_regression", False)
        contacts = self.model(batch["tokens"], return_contacts=True)["contacts"] if with_contacts else None
        for row, chain_id in enumerate(batch["chain_id"] if with_contacts else []):
            chain = self.val_chains.get(chain_id)
            if chain is None:
                continue
            length = len(batch["sequence"][row])
            native, present = contact_map(chain)
            if native.shape[0] != length:
                continue
            precision = contact_precision(contacts[row, :length, :length], native, present,
                                          residue_index=chain.residue_index)
            if not math.isnan(precision["P@L"]):
                per_chain["val_contact_p_at_l"].append(precision["P@L"])
                per_chain["val_contact_p_at_l5"].append(precision["P@L/5"])
        self.val_records.append({"chains": list(batch["chain_id"]), "nll_sum": float(loss) * int(count),
                                 "count": int(count), "per_chain": per_chain})

    def val_metrics(self, records: list[dict]) -> dict[str, float]:
        """val_nll: mean over all masked tokens; perplexity = exp(val_nll); long-range contact precision: mean
        over the chains with long-range pairs (only with the release's contact regression loaded)."""
        count = sum(r["count"] for r in records)
        nll = sum(r["nll_sum"] for r in records) / max(count, 1)
        metrics = {"val_nll": nll, "val_perplexity": math.exp(nll)}
        for name in ("val_contact_p_at_l", "val_contact_p_at_l5"):
            values = [v for r in records for v in r["per_chain"][name]]
            if values:
                metrics[name] = float(np.mean(values))
        return metrics


class RunCheckpoints(pl.Callback):
    """`checkpoints/last.ckpt` every N steps and at the end, `best.ckpt` on a new best val TM-score (fold)
    or lowest val NLL (lm), and the exported `adapter/` next to each last.ckpt. Writes are atomic; nothing
    is written on a skipped non-finite step nor after the abort, so the last good checkpoint stays intact."""

    def __init__(self, run_dir: Path, every_n_steps: int, adapter_cfg: dict):
        self.run_dir, self.every, self.adapter_cfg = run_dir, every_n_steps, adapter_cfg
        self.ckpt_dir = run_dir / "checkpoints"

    def _save(self, trainer: pl.Trainer, name: str) -> None:
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".{name}.tmp"
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, final)
        trainer.strategy.barrier()

    def _export(self, trainer: pl.Trainer, task: _Task) -> None:
        if trainer.is_global_zero:
            save_trained(task.model, self.run_dir / "adapter")

    def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx) -> None:
        if task.aborted or task.bad_steps or not trainer.global_step or trainer.global_step % self.every:
            return  # never checkpoint on a skipped (non-finite) step
        if getattr(self, "_saved_at", None) == trainer.global_step:
            return  # accumulation: several micro-batches end on the same optimizer step
        self._saved_at = trainer.global_step
        self._save(trainer, "last.ckpt")
        self._export(trainer, task)

    def on_validation_end(self, trainer, task) -> None:
        if trainer.sanity_checking or task.aborted:
            return
        metrics = trainer.callback_metrics
        if "val_tm_score" in metrics:
            value = float(metrics["val_tm_score"])
        elif "val_nll" in metrics:
            value = -float(metrics["val_nll"])
        else:
            return
        if math.isnan(task.best_val_tm) or value > task.best_val_tm:
            task.best_val_tm = value
            self._save(trainer, "best.ckpt")

    def on_train_end(self, trainer, task) -> None:
        if task.aborted:
            return
        if getattr(self, "_saved_at", None) != trainer.global_step:
            self._save(trainer, "last.ckpt")
        self._export(trainer, task)


class JobDeadline(pl.Callback):
    """Stop at an optimizer-step boundary once the wall clock passes `deadline` (epoch seconds), e.g. before a
    SLURM job's time limit: `RunCheckpoints.on_train_end` then writes last.ckpt and the run is incomplete
    (no summary.json), so a rerun resumes it. Every rank stops at the same step (any rank past it stops all)."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.reached = False

    def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches or self.reached:
            return
        if trainer.strategy.reduce_boolean_decision(time.time() >= self.deadline, all=False):
            self.reached = trainer.should_stop = True


# --------------------------------------------------------------------------------------- driver

@dataclass
class TrainResult:
    run_dir: Path
    summary: dict
    aborted: bool
    model: torch.nn.Module | None = None  # the trained in-memory model (base + adapter)


def _build(cfg: dict) -> tuple[torch.nn.Module, set[str]]:
    if cfg["kind"] == "lm":
        from pipeline.lm import build_language_model

        model = build_language_model(cfg["model"])
    else:
        from pipeline.models import build_folding_model

        model = build_folding_model(cfg["model"])
    model.float()
    if cfg["model"]["base_run"]:
        load_base_run(model, cfg["model"]["base_run"])
    base_names = set(model.state_dict())
    attach_method(model, cfg["adapter"], cfg["model"]["train_heads"], seed=cfg["trainer"]["seed"],
                  base=base_source(cfg["model"], cfg["kind"]))
    if cfg["kind"] == "fold":
        model.set_grad_checkpointing(cfg["trainer"]["grad_checkpointing"])
    return model, base_names


def _precision(cfg: dict, on_gpu: bool) -> str:
    precision = str(cfg["trainer"]["precision"])
    if precision == "auto":
        if on_gpu:
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return "32-true"
    return {"32": "32-true"}.get(precision, precision)


class _Data(pl.LightningDataModule):
    def __init__(self, cfg: dict, task: _Task):
        super().__init__()
        self.cfg, self.task = cfg, task
        dcfg = cfg["data"]
        train_ids = read_split(dcfg["splits"], dcfg["train_split"])
        if not train_ids:
            raise ValueError(f"data.train_split: no chains with split {dcfg['train_split']!r} in {dcfg['splits']}")
        val_ids = read_split(dcfg["splits"], dcfg["val_split"]) if dcfg["val_split"] else []
        seed = cfg["trainer"]["seed"]
        crop = dcfg["crop_size"]
        if cfg["kind"] == "lm":
            from data.dataset import SequenceDataset, collate_sequences

            self.train_set = SequenceDataset(dcfg["dataset"], train_ids, crop_size=crop, seed=seed)
            self.val_set = SequenceDataset(dcfg["dataset"], val_ids, crop_size=None, seed=seed) if val_ids else None
            self.collate = collate_sequences
        else:
            from data.dataset import FoldingDataset, collate

            self.train_set = FoldingDataset(dcfg["dataset"], train_ids, crop_size=crop, seed=seed)
            # Validation crops are fixed (epoch 0) and twice the training crop, to bound memory.
            val_crop = None if crop is None else 2 * crop
            self.val_set = FoldingDataset(dcfg["dataset"], val_ids, crop_size=val_crop, seed=seed) if val_ids else None
            self.collate = collate

    def train_dataloader(self):
        dcfg = self.cfg["data"]
        trainer = self.trainer
        sampler = StepBatchSampler(self.train_set.lengths, dcfg["batch_size"], self.cfg["trainer"]["seed"],
                                   max_tokens=dcfg["max_tokens"], start=self.task.batches_seen,
                                   rank=trainer.global_rank, world_size=trainer.world_size)
        return torch.utils.data.DataLoader(EpochIndexed(self.train_set), batch_sampler=sampler,
                                           collate_fn=self.collate, num_workers=dcfg["num_workers"],
                                           persistent_workers=dcfg["num_workers"] > 0)

    def val_dataloader(self):
        if self.val_set is None:
            return []
        sampler = ShardBatchSampler(len(self.val_set), self.cfg["data"]["batch_size"],
                                    rank=self.trainer.global_rank, world_size=self.trainer.world_size)
        return torch.utils.data.DataLoader(self.val_set, batch_sampler=sampler, collate_fn=self.collate,
                                           num_workers=self.cfg["data"]["num_workers"])


def _devices_and_strategy(tcfg: dict, on_gpu: bool) -> tuple[Any, Any]:
    """Lightning's `devices` and `strategy`. `devices: auto` = every visible GPU, or 1 process on CPU; more
    than one process (or node) is DDP over NCCL (GPU) or gloo (CPU), with the same settings whether the count
    was given or found: `find_unused_parameters` because which parameters get a gradient varies by step
    (the sampled recycles; heads such as ptm_head that no loss reaches), and no buffer broadcast (buffers are
    constants here), so validation forwards need no collective and ranks may score different batch counts."""
    devices = tcfg["devices"]
    if devices == "auto":
        devices = torch.cuda.device_count() if on_gpu else 1
    if isinstance(devices, list) and not on_gpu:
        raise ValueError(f"trainer.devices: {devices}: a list of device ids needs GPUs; on CPU give a process count")
    count = len(devices) if isinstance(devices, list) else devices
    strategy: Any = tcfg["strategy"]
    if strategy in ("auto", "ddp") and (count > 1 or tcfg["num_nodes"] > 1):
        from lightning.pytorch.strategies import DDPStrategy

        environment = None
        if os.environ.get("SLURM_NTASKS") == "1":
            # A one-task SLURM job (what the workflow submits: one task holding N GPUs): Lightning would take
            # SLURM as the launcher of the ranks and wait for N tasks; here it starts the N processes itself.
            from lightning.fabric.plugins.environments import LightningEnvironment

            environment = LightningEnvironment()
        strategy = DDPStrategy(process_group_backend="nccl" if on_gpu else "gloo", find_unused_parameters=True,
                               broadcast_buffers=False, cluster_environment=environment)
    return devices, strategy


def launched_rank() -> int:
    """This process's rank before the Trainer exists. Lightning starts ranks > 0 by rerunning the command
    (LOCAL_RANK / NODE_RANK set), srun starts every task (SLURM_PROCID): those must not touch the run
    directory before `fit` (rank 0 owns config dumps, log rotation and moving an old run aside)."""
    return max(int(os.environ.get(name) or 0) for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def die_with_parent() -> None:
    """Ranks > 0 (children of Lightning's launcher) and every process of a SLURM job get SIGKILL when their
    parent dies: otherwise a killed launcher or a cancelled job (scancel sends SIGTERM, and the job's shell dies
    first) leaves orphans that hold the run directory (measured under proctrack/linuxproc, which loses them).
    Linux only (prctl PR_SET_PDEATHSIG); a no-op elsewhere."""
    if not (launched_rank() > 0 or os.environ.get("SLURM_JOB_ID")) or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _peak_memory_mb(on_gpu: bool) -> float:
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train(cfg: dict, resume: bool = False, extra_callbacks: Sequence[pl.Callback] = (),
          deadline: float | None = None) -> TrainResult:
    """Run one resolved training config; write the run directory; return the summary. With `deadline`
    (epoch seconds) training stops there, checkpointed, as `status: stopped_at_deadline` without summary.json."""
    run_dir = Path(cfg["output_dir"])
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if resume and not ckpt.is_file():
        raise ValueError(f"--resume: {ckpt}: no checkpoint to resume from")
    if not resume and ckpt.is_file():
        raise ValueError(f"output_dir: {run_dir} already holds a run (checkpoints/last.ckpt); "
                         "pass --resume to continue it or choose another output_dir")
    # Before anything is written: a refused resume leaves the run as it was, resumable with its own config.
    resumed_step = checkpoint_step(ckpt) if resume else 0
    resumed_changes = check_resume(cfg, run_dir, ckpt, resumed_step) if resume else {}
    die_with_parent()
    tcfg = cfg["trainer"]
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        warnings.warn("no GPU found: training on CPU in fp32 (slow for real model sizes)", RuntimeWarning)
        if tcfg["threads"]:
            torch.set_num_threads(tcfg["threads"])

    chains = run_chains(cfg)
    if cfg["model"]["base_run"]:
        check_base_is_disjoint(cfg["model"]["base_run"], chains)
    pl.seed_everything(tcfg["seed"], workers=True, verbose=False)
    model, base_names = _build(cfg)
    if launched_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            _keep_previous_logs(run_dir)
            if resumed_changes:
                record_resume_changes(run_dir, resumed_step, resumed_changes)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        atomic_write_text(run_dir / "base.json", json.dumps(cfg["model"], indent=2) + "\n")
        atomic_write_text(run_dir / INPUTS_FILE, json.dumps(run_inputs(cfg), indent=2) + "\n")
        atomic_write_text(run_dir / CHAINS_FILE, json.dumps(chains, indent=2) + "\n")

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters())
    # `full` fine-tuning trains the head as part of the method: all its parameters are its own.
    head = trainable_head_params(model) if cfg["kind"] == "fold" and cfg["adapter"]["method"] != "full" else 0
    common = {"kind": cfg["kind"], "method": cfg["adapter"]["method"], "rank": cfg["adapter"]["rank"],
              "targets": list(cfg["adapter"]["targets"]), "part": cfg["adapter"]["part"],
              "train_heads": cfg["model"]["train_heads"], "trainable_params": trainable,
              "adapter_params": trainable - head, "head_params": head,
              "total_params": total, "seed": tcfg["seed"]}

    if trainable == 0 or tcfg["max_steps"] == 0:
        save_trained(model, run_dir / "adapter")
        summary = {**common, "train_seconds": 0.0, "steps": 0, "peak_memory_mb": _peak_memory_mb(on_gpu),
                   "final_train_loss": None, "best_val_tm_score": None, "status": "not_trained"}
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return TrainResult(run_dir, summary, aborted=False, model=model)

    val_chains = {}
    if cfg["kind"] == "lm":
        from data.dataset import chain_path, load_chain

        val_ids = read_split(cfg["data"]["splits"], cfg["data"]["val_split"]) if cfg["data"]["val_split"] else []
        val_chains = {c: load_chain(chain_path(cfg["data"]["dataset"], c)) for c in val_ids}
        task: _Task = LMTask(model, cfg, base_names, val_chains)
    else:
        task = FoldingTask(model, cfg, base_names)
    data = _Data(cfg, task)

    loggers: list = [pl.loggers.CSVLogger(save_dir=str(run_dir), name="", version="logs")]
    try:
        import tensorboard  # noqa: F401

        loggers.append(pl.loggers.TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard",
                                                    default_hp_metric=False))
    except ImportError:
        pass
    devices, strategy = _devices_and_strategy(tcfg, on_gpu)
    has_val = data.val_set is not None and len(data.val_set) > 0
    stop = JobDeadline(deadline) if deadline is not None else None
    accumulate = tcfg["accumulate"]
    trainer = pl.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=devices,
        num_nodes=tcfg["num_nodes"],
        strategy=strategy,
        precision=_precision(cfg, on_gpu),
        max_steps=tcfg["max_steps"],
        max_time={"seconds": tcfg["max_time_s"]} if tcfg["max_time_s"] else None,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=tcfg["grad_clip"] or None,
        val_check_interval=tcfg["val_every_n_steps"] * accumulate if has_val else None,
        check_val_every_n_epoch=None,
        limit_val_batches=None if has_val else 0,
        num_sanity_val_steps=0,
        logger=loggers,
        log_every_n_steps=1,
        callbacks=[RunCheckpoints(run_dir, tcfg["checkpoint_every_n_steps"], cfg["adapter"]), *extra_callbacks,
                   *([stop] if stop else [])],
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
    )
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    trainer.fit(task, datamodule=data, ckpt_path=str(ckpt) if resume else None, weights_only=False)
    seconds = task.train_seconds_before + (time.time() - started)

    summary = {**common, "train_seconds": round(seconds, 3), "steps": int(trainer.global_step),
               "peak_memory_mb": round(_peak_memory_mb(on_gpu), 1),
               "final_train_loss": None if math.isnan(task.last_train_loss) else task.last_train_loss,
               "best_val_tm_score": None if (cfg["kind"] != "fold" or math.isnan(task.best_val_tm))
               else task.best_val_tm,
               "status": "aborted_nonfinite_loss" if task.aborted else
               "stopped_at_deadline" if stop and stop.reached and trainer.global_step < tcfg["max_steps"] else "finished",
               "precision": _precision(cfg, on_gpu), "device": "gpu" if on_gpu else "cpu",
               "nonfinite_batches": task.nonfinite_batches, "nonfinite_chains": sorted(task.nonfinite_chains)}
    if trainer.is_global_zero:
        _flatten_metrics(run_dir)
        if summary["status"] != "stopped_at_deadline":  # an incomplete run has no summary: it is not an output yet
            atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return TrainResult(run_dir, summary, aborted=task.aborted, model=task.model)


INPUTS_FILE = "inputs.json"
# Settings that change how fast a run goes, not what it computes: a rerun may differ in them and still resume.
RUNTIME_KEYS = (("trainer", "threads"), ("data", "num_workers"))


def _file_digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_inputs(cfg: dict) -> dict:
    """What a run's result depends on: the resolved config (without `RUNTIME_KEYS`) and the digests of the
    files it reads whose names do not change when their contents do (dataset manifest, splits, base run)."""
    canonical = json.loads(json.dumps(cfg, default=str))
    for section, key in RUNTIME_KEYS:
        canonical.get(section, {}).pop(key, None)
    files = {"data.splits": Path(cfg["data"]["splits"]), "data.dataset": Path(cfg["data"]["dataset"]) / "manifest.csv"}
    if cfg["model"].get("base_run"):
        import adapters

        files["model.base_run"] = Path(cfg["model"]["base_run"]) / "adapter" / adapters.WEIGHTS_NAME
    config_digest = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
    return {"config": config_digest, "files": {name: _file_digest(path) for name, path in files.items()}}


# What a resumed run may not change: the checkpoint holds this model's and adapter's tensors (TLoRA's frozen
# projections are drawn from trainer.seed, and every batch is a function of the seed).
FIXED_ON_RESUME = ("kind", "model", "adapter", "trainer.seed")
RESUMES_FILE = "resumes.json"


def read_recorded_config(run_dir: Path) -> dict:
    """RUN/config.yaml as written by `train` (ValueError naming the file when missing or not valid YAML)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    try:
        recorded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: config: not found (is {run_dir} a foldtune run?)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: expected a mapping (the run's resolved config), got {type(recorded).__name__}")
    return recorded


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer step a Lightning checkpoint was written at (memory-mapped: tensors are not read)."""
    return int(torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True).get("global_step", 0))


def check_resume(cfg: dict, run_dir: Path, ckpt: Path, step: int) -> dict[str, tuple[Any, Any]]:
    """Compare a resume's config with the run's RUN/config.yaml before anything is written.

    Returns the changed settings (dotted key -> (run's value, new value)) a resume may make, e.g. a longer
    trainer.max_steps or another lr; raises ValueError naming every changed key of `FIXED_ON_RESUME` (the
    model, the adapter, the seed) and a max_steps below `step`, the checkpoint's. Runtime settings
    (`RUNTIME_KEYS`) are not changes."""
    recorded = flatten(json.loads(json.dumps(read_recorded_config(run_dir), default=str)), keep_empty=True)
    wanted = flatten(json.loads(json.dumps(cfg, default=str)), keep_empty=True)
    runtime = {f"{section}.{key}" for section, key in RUNTIME_KEYS}
    changed = {key: (recorded.get(key), wanted.get(key)) for key in sorted(set(recorded) | set(wanted))
               if key not in runtime and recorded.get(key) != wanted.get(key)}
    fixed = {key: pair for key, pair in changed.items()
             if any(key == f or key.startswith(f + ".") for f in FIXED_ON_RESUME)}
    if fixed:
        what = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in fixed.items())
        raise ValueError(f"--resume: {run_dir / 'config.yaml'}: {what}: a resumed run cannot change its model, "
                         "adapter or seed (resume with the run's own settings, or train into another output_dir)")
    if "trainer.max_steps" in changed:
        if cfg["trainer"]["max_steps"] < step:
            raise ValueError(f"--resume: trainer.max_steps: {cfg['trainer']['max_steps']} is below the step of "
                             f"{ckpt} ({step})")
    for key, (old, new) in changed.items():
        log.warning("%s: resuming with %s changed: %r -> %r (recorded in %s)", run_dir, key, old, new, RESUMES_FILE)
    return changed


def record_resume_changes(run_dir: Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append a resume's changed settings to RUN/resumes.json: [{"step", "time", "changed": {key: [old, new]}}]
    (RUN/config.yaml then holds the new values)."""
    path = run_dir / RESUMES_FILE
    try:
        history = json.loads(path.read_text()) if path.is_file() else []
    except ValueError:
        history = []
    history.append({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "changed": {key: [old, new] for key, (old, new) in changes.items()}})
    atomic_write_text(path, json.dumps(history, indent=2) + "\n")


def prepare_rerun(cfg: dict) -> bool:
    """`foldtune train --rerun` (what the workflow runs, so a killed or retried job picks up its work):
    True = resume OUTPUT_DIR's run, whose recorded inputs equal this config's; otherwise an existing run is
    moved aside to OUTPUT_DIR.replaced/<UTC time>/ (nothing is deleted) and False = start clean. A run
    directory without a checkpoint has nothing to resume and is started again in place."""
    run_dir = Path(cfg["output_dir"])
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        return False
    recorded = run_dir / INPUTS_FILE
    try:
        same = json.loads(recorded.read_text()) == run_inputs(cfg)
    except (OSError, ValueError):
        same = False
    if same or launched_rank() != 0:  # ranks > 0 start after rank 0 decided: a checkpoint now means resume
        return True
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = run_dir.with_name(run_dir.name + ".replaced") / stamp
    for n in range(1, 1000):
        if not aside.exists():
            break
        aside = aside.with_name(f"{stamp}.{n}")
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(run_dir, aside)
    log.warning("%s: config or inputs changed since this run started: moved it to %s, starting clean",
                run_dir, aside)
    return False


def _keep_previous_logs(run_dir: Path) -> None:
    """Before a resume: Lightning's CSVLogger restarts `logs/metrics.csv`, so keep the old one as a part."""
    current = run_dir / "logs" / "metrics.csv"
    if current.is_file():
        parts = sorted((run_dir / "logs").glob("metrics.part*.csv"))
        os.replace(current, run_dir / "logs" / f"metrics.part{len(parts):03d}.csv")


def _flatten_metrics(run_dir: Path) -> None:
    """Write RUN/metrics.csv: one row per step over all (resumed) parts of Lightning's CSV log.

    Rows a killed run logged after its last checkpoint are replaced by the resumed run's rows.
    """
    logs = run_dir / "logs"
    sources = sorted(logs.glob("metrics.part*.csv")) + [logs / "metrics.csv"]
    frames = [pd.read_csv(path) for path in sources if path.is_file() and path.stat().st_size]
    frames = [f for f in frames if "step" in f.columns and len(f)]
    if not frames:
        return
    kept = []
    for i, frame in enumerate(frames):
        later = [f["step"].min() for f in frames[i + 1:]]
        kept.append(frame[frame["step"] < min(later)] if later else frame)
    frame = pd.concat(kept, ignore_index=True).groupby("step", as_index=False).last()
    columns = ["step", "epoch"] + sorted(c for c in frame.columns if c not in ("step", "epoch"))
    frame = frame[[c for c in columns if c in frame.columns]]
    with atomic_path(run_dir / "metrics.csv") as tmp:
        frame.to_csv(tmp, index=False)
