"""Probes under parameter sharding (two CPU ranks over gloo, torchrun) equal single-process probes.

Each rank of ``sharded_probe_worker.py`` probes the same batch of a sharded copy of a seeded float64
model twice (the verifying probe and the cached one); every row of ``ProbeResult.to_rows`` must
equal the unsharded probe's in this process to 1e-5 relative, with the same coverage. FSDP2 covers
every parameter (products from captured activations and output gradients, elementwise closed forms,
module-local re-runs on gathered parameters, exact autograd through the unsharded parameters);
so does DeepSpeed ZeRO-3 on these models, while FSDP1 leaves the few parameters only the last two
paths could cover out of ``K`` and says so in ``coverage["left_out"]``, so its reference probes the
same parameters without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamics import probe
from tests.distributed.sharded_probe_worker import CASES, TASKS, case_name, model_and_batch
from tests.torchrun import start_two_ranks, wait_ranks

WORKER = Path(__file__).with_name("sharded_probe_worker.py")


def run_ranks(mode: str, tmp_path: Path, timeout: float = 240) -> dict:
    out = tmp_path / f"{mode}.json"
    log = (tmp_path / f"{mode}.log").open("w+")
    job = start_two_ranks([str(WORKER), "--mode", mode, "--out", str(out)], log, DS_ACCELERATOR="cpu")
    wait_ranks(job, log, timeout, mode)
    return json.loads(out.read_text())


def clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


def assert_same_rows(got: list, want: list) -> None:
    got_map = {tuple(r[1:4]): r[4] for r in got}
    want_map = {r[1:4]: r[4] for r in want}
    assert got_map.keys() == want_map.keys()
    for key, value in want_map.items():
        assert got_map[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key


def check(mode: str, results: dict, allowed_left_out: set[str]) -> None:
    for name, method, reshard in CASES[mode]:
        runs = results[case_name(name, method, reshard)]
        left_out = {clean(p) for p in runs[0]["coverage"]["left_out"]}
        assert left_out <= allowed_left_out, left_out
        model, batch, task_ids = model_and_batch(name)
        params = [p for n, p in model.named_parameters() if n not in left_out]
        ref = probe(model, batch, task_ids=task_ids, tasks=TASKS, method=method, params=params)
        for run in runs:  # the verifying probe, then the one reusing its verdicts
            assert_same_rows(run["rows"], ref.to_rows(0))
            assert {clean(p) for p in run["coverage"]["left_out"]} == left_out
            got = {path: {clean(p) for p in names} for path, names in run["coverage"].items()}
            want = {path: set(names) for path, names in ref.coverage.items()}
            want["left_out"] = left_out  # named in the coverage, absent from the reference's parameters
            if (
                method == "exact"
            ):  # the sharded exact probe plans (to find FSDP's tensors): it sees unused ones
                got["exact"] |= got.pop("unused")
                want["exact"] |= want.pop("unused")
            assert got == want


def test_fsdp2_probes_equal_single_process_probes(tmp_path):
    results = run_ranks("fsdp2", tmp_path)
    check("fsdp2", results, allowed_left_out=set())  # FSDP2: every parameter covered


def test_fsdp1_probes_equal_single_process_probes_on_what_they_cover(tmp_path):
    results = run_ranks("fsdp1", tmp_path)
    # the CLIP class embedding: a module-local re-run of the embeddings, which needs whole parameters
    vision = {"model.vision_tower.embeddings.class_embedding"}
    check("fsdp1", results, allowed_left_out=vision)
    assert {clean(p) for p in results["llava-auto-reshard"][0]["coverage"]["left_out"]} == vision


def test_zero3_probes_equal_single_process_probes_on_what_they_cover(tmp_path):
    pytest.importorskip("deepspeed")
    results = run_ranks("zero3", tmp_path)
    # ZeRO-3 allows one backward per forward, so nothing may need a module-local re-run: CLIP's
    # class embedding (expanded over the batch) is covered by its elementwise closed form instead
    check("zero3", results, allowed_left_out=set())
