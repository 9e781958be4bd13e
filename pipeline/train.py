"""Training: Lightning modules for folding (`kind: fold`) and masked-LM (`kind: lm`) fine-tuning, the
step-indexed data pipeline that makes `--resume` exact, and the run directory (docs/design.md).

`train(cfg, resume=False) -> TrainResult` runs one resolved config (`pipeline.config`).

Exactness of resume: every random choice of a step is a function of (seed, step) -- the batch (epoch
permutation + crop via `FoldingDataset`'s (seed, epoch, index) crops), the number of recycles and the
LM masking -- and the checkpoint holds the trainable parameters, optimizer, scheduler, global RNG states
and the count of consumed batches. On CPU a run stopped after N steps and resumed to M gives the same
adapter bit for bit as an uninterrupted M-step run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from data.io import atomic_path, atomic_write_text
from pipeline.config import dump_config

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
    if train_heads and adapter_cfg["method"] != "none":  # `none` is the untouched base: nothing trains
        from pipeline.models import head_parameters

        for param in head_parameters(model).values():
            param.requires_grad_(True)


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

    # -- randomness per step
    def step_rng(self, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg["trainer"]["seed"], salt, self.batches_seen])

    def _guard(self, loss: torch.Tensor) -> torch.Tensor | None:
        if torch.isfinite(loss):
            self.bad_steps = 0
            return loss
        self.bad_steps += 1
        limit = self.cfg["trainer"]["max_bad_steps"]
        warnings.warn(f"step {self.global_step}: non-finite loss ({loss.detach().item()}); step skipped "
                      f"({self.bad_steps}/{limit} in a row)", RuntimeWarning, stacklevel=2)
        if self.bad_steps >= limit:
            self.aborted = True
            self.trainer.should_stop = True
        return None

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
        # A finite loss can still give inf/NaN gradients (fp16 overflow is handled by the scaler): drop them.
        # One fused norm over every gradient (inf/NaN propagate into it) instead of a check per tensor.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            warnings.warn(f"step {self.global_step}: non-finite gradient; update skipped", RuntimeWarning)
            for p in self.model.parameters():
                p.grad = None

    # -- checkpoints hold trainable params + our counters + RNG
    def trainable_keys(self) -> set[str]:
        keys = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        keys |= {f"model.{n}" for n in self.model.state_dict() if n not in self.base_names}
        return keys

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["foldtune"] = {
            "batches_seen": self.batches_seen,
            "bad_steps": self.bad_steps,
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
        self.bad_steps = state.get("bad_steps", 0)
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


class FoldingTask(_Task):
    """Structure fine-tuning: `folding_loss` on cropped chains with sampled recycles; validation
    TM-score and CA-lDDT of the final structure on held-out chains."""

    def compute_loss(self, batch: dict, num_recycles: int) -> tuple[torch.Tensor, dict, Any]:
        from pipeline.losses import folding_loss

        outputs = self.model(batch["aatype"], attention_mask=batch["mask"].long(),
                             position_ids=batch["residue_index"], num_recycles=num_recycles)
        total, terms = folding_loss(outputs, batch, self.cfg["loss"])
        return total, terms, outputs

    def training_step(self, batch: dict, batch_idx: int):
        low, high = self.cfg["trainer"]["recycles"]
        recycles = int(self.step_rng(1).integers(low, high + 1))
        self.batches_seen += 1
        total, terms, _ = self.compute_loss(batch, recycles)
        loss = self._guard(total.float())
        if loss is None:
            return None
        self.last_train_loss = float(loss.detach())
        size = len(batch["chain_id"])
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=size)
        for name, value in terms.items():
            self.log(f"train_{name}", value.detach().float(), batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        high = self.cfg["trainer"]["recycles"][1]
        total, _, outputs = self.compute_loss(batch, high)
        quality = structure_quality(outputs.positions[-1][..., _CA, :], batch)
        size = len(batch["chain_id"])
        self.log("val_loss", total.float(), batch_size=size, sync_dist=True)
        self.log("val_tm_score", float(np.mean(quality["tm_score"])), batch_size=size, sync_dist=True,
                 prog_bar=True)
        self.log("val_lddt_ca", float(np.mean(quality["lddt_ca"])), batch_size=size, sync_dist=True)


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
        self.batches_seen += 1
        masked, targets = mask_tokens(batch["tokens"], generator)
        logits = self.model(masked)["logits"]
        loss, _ = masked_lm_loss(logits, targets)
        loss = self._guard(loss)
        if loss is None:
            return None
        self.last_train_loss = float(loss.detach())
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=len(batch["chain_id"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        from pipeline.lm import contact_map, contact_precision, mask_tokens, masked_lm_loss

        generator = torch.Generator().manual_seed(self.cfg["trainer"]["seed"] * 1000003 + batch_idx)
        masked, targets = mask_tokens(batch["tokens"], generator)
        loss, count = masked_lm_loss(self.model(masked)["logits"], targets)
        self.log("val_nll", loss, batch_size=count, sync_dist=True)
        contacts = self.model(batch["tokens"], return_contacts=True)["contacts"]
        for row, chain_id in enumerate(batch["chain_id"]):
            chain = self.val_chains.get(chain_id)
            if chain is None:
                continue
            length = len(batch["sequence"][row])
            native, present = contact_map(chain)
            if native.shape[0] != length:
                continue
            precision = contact_precision(contacts[row, :length, :length], native, present)
            if not math.isnan(precision["P@L"]):
                self.log("val_contact_p_at_l", precision["P@L"], batch_size=1, sync_dist=True)
                self.log("val_contact_p_at_l5", precision["P@L/5"], batch_size=1, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        nll = self.trainer.callback_metrics.get("val_nll")
        if nll is not None:
            self.log("val_perplexity", float(torch.exp(nll)), sync_dist=False)


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
        return torch.utils.data.DataLoader(self.val_set, batch_size=self.cfg["data"]["batch_size"],
                                           shuffle=False, collate_fn=self.collate,
                                           num_workers=self.cfg["data"]["num_workers"])


def _peak_memory_mb(on_gpu: bool) -> float:
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train(cfg: dict, resume: bool = False, extra_callbacks: Sequence[pl.Callback] = ()) -> TrainResult:
    """Run one resolved training config; write the run directory; return the summary."""
    run_dir = Path(cfg["output_dir"])
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if resume and not ckpt.is_file():
        raise ValueError(f"--resume: {ckpt}: no checkpoint to resume from")
    if not resume and ckpt.is_file():
        raise ValueError(f"output_dir: {run_dir} already holds a run (checkpoints/last.ckpt); "
                         "pass --resume to continue it or choose another output_dir")
    tcfg = cfg["trainer"]
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        warnings.warn("no GPU found: training on CPU in fp32 (slow for real model sizes)", RuntimeWarning)
        if tcfg["threads"]:
            torch.set_num_threads(tcfg["threads"])

    pl.seed_everything(tcfg["seed"], workers=True, verbose=False)
    model, base_names = _build(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        _keep_previous_logs(run_dir)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    atomic_write_text(run_dir / "base.json", json.dumps(cfg["model"], indent=2) + "\n")

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters())
    common = {"kind": cfg["kind"], "method": cfg["adapter"]["method"], "rank": cfg["adapter"]["rank"],
              "targets": list(cfg["adapter"]["targets"]), "part": cfg["adapter"]["part"],
              "train_heads": cfg["model"]["train_heads"], "trainable_params": trainable,
              "total_params": total, "seed": tcfg["seed"]}

    if cfg["adapter"]["method"] == "none" or tcfg["max_steps"] == 0:
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
    strategy: Any = tcfg["strategy"]
    devices = tcfg["devices"]
    multi = tcfg["num_nodes"] > 1 or (isinstance(devices, int) and devices > 1) or isinstance(devices, list) and len(devices) > 1
    if on_gpu and strategy in ("auto", "ddp") and multi:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(find_unused_parameters=True)  # e.g. ptm_head gets no loss gradient
    has_val = data.val_set is not None and len(data.val_set) > 0
    accumulate = tcfg["accumulate"]
    trainer = pl.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=devices if on_gpu else 1,
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
        callbacks=[RunCheckpoints(run_dir, tcfg["checkpoint_every_n_steps"], cfg["adapter"]), *extra_callbacks],
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
               "status": "aborted_nonfinite_loss" if task.aborted else "finished",
               "precision": _precision(cfg, on_gpu), "device": "gpu" if on_gpu else "cpu"}
    if trainer.is_global_zero:
        _flatten_metrics(run_dir)
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return TrainResult(run_dir, summary, aborted=task.aborted, model=task.model)


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
