"""Multi-process DDP on CPU (gloo): real `foldtune train` processes, 2 ranks, a tiny random model.

What the 2-rank equality compares: rank r of W consumes global batches r, r + W, ... and every random choice
of a batch (recycles, dropout) is seeded by its global index, so 2 ranks x batch 1 x accumulate A see exactly
the batches of 1 rank x batch 1 x accumulate 2A in each optimizer step, and the update is the same mean
gradient: DDP averages the ranks' gradients, accumulation averages the micro-batches' (Lightning divides each
loss by A). Only the order of the fp32 sums differs, hence a tolerance instead of equality: measured max
|difference| 4.4e-6 here and 3.8e-5 on the CI machine (other BLAS kernels) after 4 AdamW steps at lr 3e-3 --
Adam's normalisation magnifies rounding where a gradient nearly cancels, as in a bias of the IPA -- while any
real difference (other batches, one rank's gradient only) moves weights by the order of an update, ~lr = 3e-3:
the bound lr / 10 = 3e-4 sits a factor ~8 from each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests._train_helpers import make_dataset

REPO = Path(__file__).resolve().parents[1]
FOLDTUNE = [sys.executable, "-m", "pipeline.cli"]
TIMEOUT = 900  # s per process (a 2-rank run took 127 s on 2 cores at load 13); a DDP hang fails, never stalls
ADAPTER = Path("adapter") / "adapter_model.safetensors"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 4 short train chains (20-47 residues), one of them also the only val chain: with 2 ranks, rank 1's val
    # shard repeats it
    root = tmp_path_factory.mktemp("ddp")
    return make_dataset(root / "dataset", [("1l2y.pdb", "train"), ("1vii.pdb", "train"), ("1psm.cif", "train+val"),
                                           ("1ejg.pdb", "train")])


def write_config(dataset, path: Path, out: Path, **trainer) -> Path:
    ds, splits = dataset
    cfg = {
        "adapter": {"method": "lora", "rank": 2, "alpha": 4, "dropout": 0.1},  # dropout: RNG per global batch
        "model": {"train_heads": True},  # heads outside the trunk: ptm_head gets no gradient (unused params)
        "data": {"dataset": str(ds), "splits": str(splits), "crop_size": 16, "batch_size": 1},
        "trainer": {"max_steps": 4, "lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "recycles": [0, 1],
                    "val_every_n_steps": 2, "checkpoint_every_n_steps": 1, "threads": 1, **trainer},
        "output_dir": str(out),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(args: list[str], log: Path, prefix: list[str] = FOLDTUNE) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "w") as handle:
        started = time.time()
        result = subprocess.run([*prefix, *args], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                timeout=TIMEOUT)
    print(f"{' '.join(args[:1] + args[-3:])}: {time.time() - started:.1f} s")
    result.log = log.read_text()
    return result


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / ADAPTER))


@pytest.fixture(scope="module")
def two_ranks(dataset, tmp_path_factory):
    """The reference 2-rank run: batch 1 per rank, accumulate 2 (4 chains per optimizer step)."""
    tmp = tmp_path_factory.mktemp("two")
    config = write_config(dataset, tmp / "cfg.yaml", tmp / "run", devices=2, accumulate=2)
    result = run(["train", "--config", str(config)], tmp / "train.log")
    assert result.returncode == 0, result.log[-3000:]
    return tmp / "run"


def test_two_ranks_equal_one_rank_with_the_same_global_batch(dataset, two_ranks, tmp_path):
    config = write_config(dataset, tmp_path / "cfg.yaml", tmp_path / "one", devices=1, accumulate=4)
    result = run(["train", "--config", str(config)], tmp_path / "train.log")
    assert result.returncode == 0, result.log[-3000:]
    two, one = adapter(two_ranks), adapter(tmp_path / "one")
    assert two.keys() == one.keys() and any("lora_B" in k for k in two) and any("structure_module" in k for k in two)
    for key in two:
        assert torch.allclose(two[key], one[key], rtol=0, atol=3e-4), (key, (two[key] - one[key]).abs().max())
    moved = max(float(v.abs().max()) for k, v in two.items() if "lora_B" in k)
    assert moved > 1e-3  # lora_B starts at 0: the comparison is between trained weights
    summaries = [json.loads((d / "summary.json").read_text()) for d in (two_ranks, tmp_path / "one")]
    assert [s["steps"] for s in summaries] == [4, 4] and [s["status"] for s in summaries] == ["finished"] * 2
    # Validation: 1 val chain, 2 ranks (rank 1 repeats it): gathered, the chain counts once -> same metrics.
    metrics = [pd.read_csv(d / "metrics.csv").dropna(subset=["val_tm_score"]) for d in (two_ranks, tmp_path / "one")]
    assert metrics[0]["step"].tolist() == metrics[1]["step"].tolist() and len(metrics[0]) == 2
    for column in ("val_tm_score", "val_lddt_ca", "val_loss"):
        assert metrics[0][column].tolist() == pytest.approx(metrics[1][column].tolist(), rel=1e-4), column


def test_nan_on_one_rank_skips_the_step_on_both(dataset, tmp_path):
    config = write_config(dataset, tmp_path / "cfg.yaml", tmp_path / "run", devices=2, max_steps=4,
                          val_every_n_steps=100)
    # rank 1's second batch (optimizer step 2 of 4) is NaN; rank 0's is fine
    result = run(["--config", str(config)], tmp_path / "train.log",
                 prefix=[sys.executable, str(REPO / "tests" / "ddp_driver.py"), "1", "1", str(tmp_path), "--", ])
    assert result.returncode == 0, result.log[-3000:]
    assert "non-finite loss (nan); step skipped on all 2 rank(s)" in result.log  # rank 1
    assert "non-finite loss on another rank; step skipped on all 2 rank(s)" in result.log  # rank 0
    traces = [json.loads((tmp_path / f"trace_rank{r}.json").read_text()) for r in (0, 1)]
    for trace in traces:
        weights = [t["weights"] for t in trace]
        assert [t["step"] for t in trace] == [1, 2, 3, 4]
        assert weights[1] == weights[0]  # the skipped step changed nothing, on both ranks
        assert weights[2] != weights[1] and weights[3] != weights[2]  # the others trained
        assert [t["bad_steps"] for t in trace] == [0, 1, 0, 0]
    assert [t["weights"] for t in traces[0]] == [t["weights"] for t in traces[1]]  # ranks never diverged
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4
    assert all(torch.isfinite(v).all() for v in adapter(tmp_path / "run").values())
    # rank 1's chain is named on both ranks and in the summary (rank 0 writes it)
    assert summary["nonfinite_batches"] == 1 and len(summary["nonfinite_chains"]) == 1
    assert result.log.count(f"chains: {summary['nonfinite_chains'][0]}") >= 2


def test_kill_9_of_the_launcher_then_resume_gives_the_uninterrupted_adapter(dataset, two_ranks, tmp_path):
    config = write_config(dataset, tmp_path / "cfg.yaml", tmp_path / "run", devices=2, accumulate=2)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "killed.log", "w") as log:
        launcher = subprocess.Popen([*FOLDTUNE, "train", "--config", str(config)], cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    group = launcher.pid  # its own session: the launcher and the rank it starts
    try:
        deadline = time.time() + TIMEOUT
        while not ckpt.is_file():
            assert launcher.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint written"
            time.sleep(0.02)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        # the orphaned rank 1 loses its peer in the next collective and exits by itself
        waited = time.time()
        while time.time() - waited < 60:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("rank 1 kept running for 60 s after its launcher was killed")
    finally:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    step = torch.load(ckpt, weights_only=False)["global_step"]
    assert 1 <= step < 4 and not (tmp_path / "run" / "summary.json").exists()  # killed mid-run
    result = run(["train", "--config", str(tmp_path / "run" / "config.yaml"), "--resume"], tmp_path / "resume.log")
    assert result.returncode == 0, result.log[-3000:]
    resumed, reference = adapter(tmp_path / "run"), adapter(two_ranks)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    ckpt_state = torch.load(ckpt, weights_only=False)
    assert ckpt_state["global_step"] == 4 and ckpt_state["foldtune"]["batches_seen"] == 8  # per rank: 4 x 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4
