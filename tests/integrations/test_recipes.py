"""The recipes in hooks/ run end to end on tiny models (torchrun_ddp.py: see test_ddp.py)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from dynamics import load_runs

HOOKS = Path(__file__).resolve().parents[2] / "hooks"


def _main(name: str):
    return runpy.run_path(str(HOOKS / f"{name}.py"))["main"]


def test_hf_trainer_recipe(tmp_path):
    run_dir = _main("hf_trainer")(
        [
            "--out",
            str(tmp_path),
            "--model",
            "llava",
            "--steps",
            "6",
            "--probe-every",
            "3",
            "--eval-every",
            "3",
        ]
    )
    rs = load_runs(run_dir)
    m = rs.metrics
    assert sorted(m.loc[m["name"] == "train_loss", "step"]) == list(range(1, 7))
    assert sorted(m.loc[m["name"] == "fisher_se", "step"]) == [3, 6]
    curve = m[m["name"] == "eval_loss"]
    assert sorted(set(curve["task"])) == ["caption", "report", "vqa"]
    assert sorted(curve["step"].unique()) == [3, 6]  # every evaluation, at its step
    scores = rs.scores.set_index(["task", "metric"])["value"]
    assert {("caption", "accuracy"), ("vqa", "accuracy"), ("report", "accuracy"), ("", "accuracy")} <= set(
        scores.index
    )
    assert scores.notna().all() and ("", "loss") not in scores.index
    assert rs.runs.loc[0, "model"] == "llava"


def test_plain_loop_recipe(tmp_path, capsys):
    run_dir = _main("plain_loop")(["--out", str(tmp_path / "dyn"), "--steps", "20", "--probe-every", "10"])
    rs = load_runs(run_dir)
    m = rs.metrics
    assert sorted(m.loc[m["name"] == "update_cosine", "step"].unique()) == [10, 20]
    assert m.loc[m["name"] == "n_examples"].groupby("step")["value"].sum().eq(24).all()
    acc = rs.scores.set_index(["task", "metric"])["value"]
    assert acc[("", "accuracy")] == pytest.approx(
        acc[[("shape", "accuracy"), ("color", "accuracy"), ("size", "accuracy")]].mean()
    )
    assert "dynamics/loss/shape" in capsys.readouterr().out
