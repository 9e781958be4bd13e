"""`foldtune train --rerun` (what the workflow's train/base rules run) and `--deadline`: a killed job resumes
when its config and inputs are unchanged, a changed one starts clean with the old run moved aside, and a job
stopped at its deadline is checkpointed, incomplete, and resumable."""

from __future__ import annotations

import json
import os
import signal

import lightning.pytorch as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.commands.train import _slurm_seconds, resolve_deadline
from pipeline.config import resolve
from pipeline.train import train
from tests._train_helpers import make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerun")
    return make_dataset(root / "dataset", [("1l2y.pdb", "train"), ("1vii.pdb", "train")])


def _cfg(dataset, out, **trainer) -> dict:
    ds, splits = dataset
    return resolve({
        "adapter": {"method": "lora", "rank": 2, "alpha": 4},
        "data": {"dataset": str(ds), "splits": str(splits), "crop_size": 16, "batch_size": 1, "val_split": None},
        "trainer": {"max_steps": 5, "lr": 3e-3, "warmup_steps": 0, "checkpoint_every_n_steps": 2, "threads": 1,
                    **trainer},
        "output_dir": str(out),
    })


class _Kill(pl.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated kill")


def _write(cfg: dict, path) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _weights(run_dir) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_rerun_resumes_a_killed_run_with_the_same_config(dataset, tmp_path):
    reference = train(_cfg(dataset, tmp_path / "full"))
    cfg = _cfg(dataset, tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(cfg, extra_callbacks=[_Kill(3)])
    # The workflow's command: same config file; only a runtime setting (threads) differs.
    config = _write({**cfg, "trainer": {**cfg["trainer"], "threads": 2}}, tmp_path / "cfg.yaml")
    assert main(["train", "--config", config, "--rerun", "trainer.threads=1"]) == 0
    assert not (tmp_path / "run.replaced").exists()
    assert (tmp_path / "run" / "logs" / "metrics.part000.csv").is_file()  # the killed part's log was resumed
    full, resumed = _weights(reference.run_dir), _weights(tmp_path / "run")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # A rerun of the finished run (Snakemake forced it, same config): resumes at max_steps, same result.
    assert main(["train", "--config", config, "--rerun"]) == 0
    assert all(torch.equal(full[k], v) for k, v in _weights(tmp_path / "run").items())


def test_rerun_with_a_changed_config_or_input_starts_clean(dataset, tmp_path):
    cfg = _cfg(dataset, tmp_path / "run")
    train(cfg)
    old = _weights(tmp_path / "run")
    changed = _write({**cfg, "trainer": {**cfg["trainer"], "lr": 1e-3}}, tmp_path / "cfg.yaml")
    assert main(["train", "--config", changed, "--rerun"]) == 0
    aside = list((tmp_path / "run.replaced").iterdir())
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "last.ckpt").is_file()  # nothing deleted
    assert all(torch.equal(old[k], v) for k, v in _weights(aside[0]).items())
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["trainer"]["lr"] == 1e-3
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 5 and not list((tmp_path / "run" / "logs").glob("metrics.part*.csv"))  # clean
    # Same config text, but an input file changed (the splits): also a new run.
    splits = dataset[1]
    original = splits.read_text()
    try:
        splits.write_text(original.replace("1vii_A,train", "1vii_A,val"))
        assert main(["train", "--config", changed, "--rerun"]) == 0
    finally:
        splits.write_text(original)
    assert len(list((tmp_path / "run.replaced").iterdir())) == 2
    inputs = json.loads((tmp_path / "run" / "inputs.json").read_text())
    assert set(inputs["files"]) == {"data.splits", "data.dataset"} and all(inputs["files"].values())


def test_deadline_stops_checkpointed_and_a_rerun_finishes(dataset, tmp_path, capsys):
    cfg = _cfg(dataset, tmp_path / "run", max_steps=40, checkpoint_every_n_steps=100)
    config = _write(cfg, tmp_path / "cfg.yaml")
    assert main(["train", "--config", config, "--rerun", "--deadline", "0.01"]) == 4
    assert "stopped at the deadline at step 1 of 40" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 1 and not (tmp_path / "run" / "summary.json").exists()  # incomplete
    assert main(["train", "--config", config, "--rerun"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 40


@pytest.mark.parametrize("text, seconds", [("1-02:03:04", 93784), ("02:03:04", 7384), ("3:04", 184),
                                            ("0:00", 0), ("UNLIMITED", None), ("NOT_SET", None), ("", None)])
def test_squeue_time_left(text, seconds):
    assert _slurm_seconds(text) == seconds


def test_deadline_auto_outside_slurm_is_none(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert resolve_deadline("auto") is None and resolve_deadline(None) is None


def test_deadline_and_rerun_arguments_are_checked(dataset, tmp_path, capsys):
    config = _write(_cfg(dataset, tmp_path / "run"), tmp_path / "cfg.yaml")
    assert main(["train", "--config", config, "--deadline", "soon"]) == 2
    assert main(["train", "--config", config, "--deadline", "-5"]) == 2
    assert main(["train", "--config", config, "--rerun", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--deadline: 'soon': expected `auto` or a number of seconds" in err and "must be > 0" in err
    assert "pass it without --resume" in err


def test_resume_refuses_a_changed_model_before_writing_and_records_allowed_changes(dataset, tmp_path, capsys):
    cfg = _cfg(dataset, tmp_path / "run")
    train(cfg)
    run = tmp_path / "run"
    config = str(run / "config.yaml")
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "inputs.json")}
    # A refused resume names what changed and leaves the run resumable with its own config.
    assert main(["train", "--config", config, "--resume", "adapter.rank=8", "trainer.seed=3"]) == 2
    err = capsys.readouterr().err
    assert "adapter.rank: 2 -> 8" in err and "trainer.seed: 0 -> 3" in err and "cannot change" in err
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not (run / "logs" / "metrics.part000.csv").exists()
    assert main(["train", "--config", config, "--resume", "trainer.max_steps=3"]) == 2
    assert "trainer.max_steps: 3 is below the step" in capsys.readouterr().err
    # Allowed changes (a longer run, another lr) resume and are recorded in the run.
    assert main(["train", "--config", config, "--resume", "trainer.max_steps=7", "trainer.lr=1e-3"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 7
    recorded = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert recorded["max_steps"] == 7 and recorded["lr"] == 1e-3
    history = json.loads((run / "resumes.json").read_text())
    assert [(h["step"], h["changed"]) for h in history] == [
        (5, {"trainer.lr": [3e-3, 1e-3], "trainer.max_steps": [5, 7]})]
    # The recorded inputs follow, so the workflow's --rerun with the new settings resumes instead of starting over.
    assert main(["train", "--config", config, "--rerun"]) == 0 and not (tmp_path / "run.replaced").exists()


def test_resume_names_a_run_config_that_is_not_yaml(dataset, tmp_path, capsys):
    cfg = _cfg(dataset, tmp_path / "run")
    train(cfg)
    good = _write(cfg, tmp_path / "cfg.yaml")
    (tmp_path / "run" / "config.yaml").write_text("trainer: {max_steps: 5\nadapter: [\n")
    assert main(["train", "--config", good, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run' / 'config.yaml'}: not valid YAML (line" in err and "Traceback" not in err


class _CtrlC(pl.Callback):
    """The user presses Ctrl-C at this step: a real SIGINT to this process."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_in_training_is_one_line_and_the_run_resumes(dataset, tmp_path, capsys, monkeypatch):
    import pipeline.train as train_module

    cfg = _cfg(dataset, tmp_path / "run")
    config = _write(cfg, tmp_path / "cfg.yaml")
    real_train = train_module.train
    monkeypatch.setattr(train_module, "train", lambda c, **kw: real_train(c, extra_callbacks=[_CtrlC(3)], **kw))
    try:
        assert main(["train", "--config", config]) == 130
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores SIGINT after its shutdown
    assert "foldtune train: interrupted (Ctrl-C); the run continues from" in capsys.readouterr().err
    monkeypatch.setattr(train_module, "train", real_train)
    assert main(["train", "--config", config, "--rerun"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 5
