"""TensorBoard import and the `dynamics runs` / `dynamics import-tb` commands."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dynamics import RunWriter, load_runs
from dynamics.cli import app
from dynamics.store.schema import parse_tb_tag, tb_tag


def _write_events(logdir, tags_values):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(logdir))
    for step in range(5):
        for tag, fn in tags_values.items():
            writer.add_scalar(tag, fn(step), step)
    writer.close()


@pytest.mark.parametrize(
    ("row", "tag"),
    [
        (("loss", "", ""), "dynamics/loss"),
        (("loss", "vqa", ""), "dynamics/loss/vqa"),
        (("grad_cosine", "a", "b"), "dynamics/grad_cosine/a|b"),
    ],
)
def test_tb_tags_round_trip(row, tag):
    assert tb_tag(*row) == tag
    assert parse_tb_tag(tag) == row
    assert parse_tb_tag("train/" + tag) == row  # HF's TensorBoardCallback prefix
    assert parse_tb_tag("train/learning_rate") == ("train/learning_rate", "", "")


def test_import_tensorboard_maps_dynamics_tags_back(tmp_path):
    _write_events(
        tmp_path / "tb" / "run-a",
        {
            "train/dynamics/loss/vqa": lambda s: 1.0 / (s + 1),
            "train/dynamics/grad_cosine/vqa|ctr": lambda s: -0.5,
            "train/loss": float,
        },
    )
    result = CliRunner().invoke(
        app, ["import-tb", str(tmp_path / "tb"), str(tmp_path / "out"), "--tag", "construction=IMAX"]
    )
    assert result.exit_code == 0, result.output
    rs = load_runs(tmp_path / "out")
    assert rs.runs.loc[0, "construction"] == "IMAX" and sorted(rs.runs.loc[0, "tasks"]) == ["ctr", "vqa"]
    m = rs.metrics
    loss = m[(m.name == "loss") & (m.task == "vqa")].sort_values("step")
    assert loss.value.round(6).tolist() == [round(1.0 / (s + 1), 6) for s in range(5)]
    cos = m[m.name == "grad_cosine"]
    assert set(zip(cos.task, cos.task_b, strict=True)) == {("vqa", "ctr")} and (cos.value == -0.5).all()
    assert m[m.name == "train/loss"].value.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_import_tb_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["import-tb", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "not a directory" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["import-tb", str(tmp_path / "empty"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "no TensorBoard event files" in result.output


def test_runs_command_lists_tags_steps_and_metrics(tmp_path):
    for seed in (0, 1):
        with RunWriter(
            tmp_path / f"s{seed}", tasks=["vqa"], tags={"construction": "DMAX", "seed": seed}
        ) as w:
            w.log_many(range(7), "loss", 1.0, "vqa")
            w.log(6, "fisher_se", 2.0)
    result = CliRunner().invoke(app, ["runs", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "2 run(s)" in result.output and "DMAX" in result.output
    assert "fisher_se, loss" in result.output and " 6 " in result.output
    bad = CliRunner().invoke(app, ["runs", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "does not exist" in bad.output
