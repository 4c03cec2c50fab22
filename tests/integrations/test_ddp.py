"""DDP with two CPU processes over gloo (torchrun): losses of the global batch, one writer, no hang."""

from __future__ import annotations

import json
import runpy

import pyarrow.parquet as pq
import pytest

from dynamics import load_runs
from dynamics.store.reader import find_run_dirs
from tests.torchrun import ROOT, start_two_ranks, wait_ranks

RECIPE = ROOT / "hooks" / "torchrun_ddp.py"
ARGS = [
    "--steps",
    "4",
    "--grad-accum",
    "2",
    "--global-batch-size",
    "8",
    "--probe-every",
    "2",
    "--probe-size",
    "6",
]


def test_two_gloo_ranks_record_the_single_process_losses_once(tmp_path):
    log = (tmp_path / "torchrun.log").open("w+")
    ddp_job = start_two_ranks(
        [str(RECIPE), "--out", str(tmp_path / "ddp"), "--history", str(tmp_path / "history"), *ARGS], log
    )
    try:
        # Meanwhile, the same global batches in one process (this one).
        # The recipe puts its own folder on sys.path to import its sibling, as when run as a script.
        runpy.run_path(str(RECIPE))["main"](["--out", str(tmp_path / "single"), *ARGS])
    finally:
        wait_ranks(ddp_job, log, 120, "DDP")  # also if the single-process run failed: no rank left behind

    [run_dir] = find_run_dirs(tmp_path / "ddp")  # only rank 0 wrote
    raw = pq.read_table(run_dir / "metrics").to_pandas()  # every part as written, no de-duplication
    assert not raw.duplicated(["step", "name", "task", "task_b"]).any()
    assert sorted(raw.loc[raw["name"] == "train_loss", "step"]) == [1, 2, 3, 4]

    ddp = load_runs(tmp_path / "ddp").metrics.set_index(["step", "name", "task", "task_b"])["value"]
    single = load_runs(tmp_path / "single").metrics.set_index(["step", "name", "task", "task_b"])["value"]
    assert set(ddp.index) == set(single.index)
    for name in ("loss", "n_examples", "n_tokens", "train_loss"):
        a, b = ddp.xs(name, level="name"), single.xs(name, level="name")
        assert a.sort_index().tolist() == pytest.approx(b.sort_index().tolist(), rel=1e-5), name
    for name in ("grad_norm", "grad_cosine", "update_cosine", "fisher_se"):
        a, b = ddp.xs(name, level="name"), single.xs(name, level="name")
        assert sorted(a.index.get_level_values("step").unique()) == [2, 4]
        assert a.sort_index().tolist() == pytest.approx(b.sort_index().tolist(), rel=1e-4, abs=1e-6), name

    # No rank idles while another probes: both ranks probed the same held batch at steps 2 and 4.
    ranks = [json.loads((tmp_path / "history" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["probes_run"] for r in ranks] == [[2, 4], [2, 4]]
    # The token-weighted mean of the per-task losses is the loss the Trainer logs (global batch).
    logged = {h["step"]: h["loss"] for h in ranks[0]["log_history"] if "loss" in h}
    loss, tokens = ddp.xs("loss", level="name"), ddp.xs("n_tokens", level="name")
    for step, value in logged.items():
        weighted = sum(loss[(step, t, "")] * tokens[(step, t, "")] for t in ("caption", "vqa", "report")
                       if (step, t, "") in loss.index)  # fmt: skip
        total = sum(tokens[(step, t, "")] for t in ("caption", "vqa", "report"))
        assert f"{weighted / total:.4g}" == f"{value:.4g}"  # to the printed digits
        assert weighted / total == pytest.approx(value, rel=1e-5)
