"""`foldtune train` with a fault injected on one DDP rank, for tests/test_train_ddp.py.

    python tests/ddp_driver.py NAN_RANK NAN_BATCH OUT_DIR -- <foldtune train arguments>

Lightning starts the other ranks by rerunning this same command, so every rank applies the same patches:
the training loss of rank NAN_RANK's local batch NAN_BATCH (0-based) becomes NaN, and every rank writes the
sum of |trainable parameters| after each optimizer step to OUT_DIR/trace_rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.cli import main
from pipeline.train import FoldingTask, RunCheckpoints


def install(nan_rank: int, nan_batch: int, out: Path) -> None:
    real_loss = FoldingTask.compute_loss
    real_end = RunCheckpoints.on_train_batch_end
    trace: list[dict] = []

    def poisoned(self, batch, num_recycles):
        total, terms, outputs = real_loss(self, batch, num_recycles)
        # training_step counts the batch before computing its loss: batches_seen - 1 is its local index
        if self.training and self.global_rank == nan_rank and self.batches_seen - 1 == nan_batch:
            total = total * float("nan")
        return total, terms, outputs

    def traced(self, trainer, task, outputs, batch, batch_idx):
        weights = sum(float(p.detach().abs().sum()) for p in task.model.parameters() if p.requires_grad)
        trace.append({"step": trainer.global_step, "batch": task.batches_seen - 1, "weights": weights,
                      "bad_steps": task.bad_steps})
        (out / f"trace_rank{trainer.global_rank}.json").write_text(json.dumps(trace))
        real_end(self, trainer, task, outputs, batch, batch_idx)

    FoldingTask.compute_loss = poisoned
    RunCheckpoints.on_train_batch_end = traced


if __name__ == "__main__":
    split = sys.argv.index("--")
    rank, index, out_dir = sys.argv[1:split]
    install(int(rank), int(index), Path(out_dir))
    sys.exit(main(["train", *sys.argv[split + 1:]]))
