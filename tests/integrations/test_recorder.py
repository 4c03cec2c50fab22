"""The framework-agnostic recorder and the plain-loop API: sums, store rows, logs, bad input, probes."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import dynamics.probing
from dynamics import LoopRecorder, load_runs
from dynamics.integrations.recorder import MAX_PROBE_FAILURES, DynamicsWarning, Recorder, parse_eval_metrics
from tests.integrations.hook_helpers import TASKS, token_losses
from tests.tiny_models import llama_batch, mlp, mlp_batch


def _micro_batches(n_steps: int, accum: int):
    """Random causal-LM logits with llama_batch labels: (logits, labels, task_ids) per micro-batch."""
    gen = torch.Generator().manual_seed(0)
    for s in range(n_steps):
        for m in range(accum):
            batch, ids = llama_batch(n=5, seq_len=8, seed=10 * s + m)
            yield s + 1, torch.randn(5, 8, 64, generator=gen), batch["labels"], ids


def _reference(micro) -> dict[int, dict[str, tuple[float, float, int]]]:
    """Per step and task: (sum of token losses, tokens, examples), by explicit loops."""
    out: dict[int, dict[str, list]] = {}
    for step, logits, labels, ids in micro:
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        sums, counts = token_losses(logits, shifted)
        per = out.setdefault(step, {t: [0.0, 0, 0] for t in TASKS})
        for i, a in enumerate(ids.tolist()):
            per[TASKS[a]][0] += sums[i]
            per[TASKS[a]][1] += counts[i]
            per[TASKS[a]][2] += 1
    return out


def test_store_rows_equal_explicit_per_task_losses(tmp_path):
    micro = list(_micro_batches(n_steps=3, accum=2))
    rec = LoopRecorder(
        mlp(), tasks=TASKS, out_dir=tmp_path / "run", probe_every=0, loss="causal_lm", sync_every=2
    )
    lr_source = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.25)
    for step in (1, 2, 3):
        for s, logits, labels, ids in micro:
            if s == step:
                rec.observe(logits, labels, ids)
        with rec.update(lr_source if step == 3 else None):
            pass
    rec.close()
    ref = _reference(micro)
    m = load_runs(tmp_path / "run").metrics
    assert sorted(m.loc[m["name"] == "train_loss", "step"]) == [1, 2, 3]
    assert not m.duplicated(["step", "name", "task", "task_b"]).any()
    for step, per in ref.items():
        rows = m[m["step"] == step].set_index(["name", "task"])["value"]
        for task, (s, n, k) in per.items():
            assert rows[("n_examples", task)] == k and rows[("n_tokens", task)] == n
            assert rows[("loss", task)] == pytest.approx(s / n, rel=1e-5)
        total = sum(v[0] for v in per.values()) / sum(v[1] for v in per.values())
        assert rows[("train_loss", "")] == pytest.approx(total, rel=1e-5)
    assert m.loc[m["name"] == "lr", "step"].tolist() == [3]


def test_logs_are_token_weighted_over_the_window_and_reset():
    micro = list(_micro_batches(n_steps=2, accum=1))
    rec = Recorder(TASKS, probe_every=0, loss="causal_lm")
    for step, logits, labels, ids in micro:
        rec.observe_logits(logits, labels, ids)
        rec.end_step(step)
    logs = rec.logs()
    ref = _reference(micro)
    for task in TASKS:
        s = sum(ref[k][task][0] for k in ref)
        n = sum(ref[k][task][1] for k in ref)
        assert logs[f"dynamics/loss/{task}"] == pytest.approx(s / n, rel=1e-5)
        assert logs[f"dynamics/n_examples/{task}"] == sum(ref[k][task][2] for k in ref)
    assert rec.logs() == {}  # nothing new since


def test_bad_task_ids_warn_once_and_keep_the_rest(tmp_path):
    model = mlp()
    rec = LoopRecorder(model, tasks=TASKS, out_dir=tmp_path / "run", probe_every=0)
    batch, ids = mlp_batch(n=6)
    with pytest.warns(DynamicsWarning) as caught:
        for _ in range(3):  # no task ids: the same message only once
            model(**batch)
        bad = ids.clone()
        bad[0] = 7
        model(**batch, task_ids=bad)  # out of range: reported, the other 5 examples kept
        model(**batch, task_ids=ids[:4])  # wrong length: reported, batch skipped
        with rec.update():
            pass
        rec.close()  # out-of-range ids are counted on the device and reported at the sync
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3
    assert "no 'task_ids'" in messages[0]
    assert "dropped 1 of 6 training examples over the run so far (the first at step 1)" in messages[1]
    assert "one task index per example" in messages[2]
    assert rec.recorder.problems["no_task_ids"] == 3
    m = load_runs(tmp_path / "run").metrics
    counts = m[m["name"] == "n_examples"].set_index("task")["value"]
    expected = np.bincount(ids[1:].numpy(), minlength=3)
    assert counts[TASKS].tolist() == expected.tolist()


def _train_probing_every_step(run_dir, steps: int) -> None:
    """A few SGD steps of the tiny MLP with a LoopRecorder that probes after every step."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe_batch, probe_ids = mlp_batch(n=6, seed=9)
    rec = LoopRecorder(
        model, tasks=TASKS, out_dir=run_dir, probe_every=1, probe_batch={**probe_batch, "task_ids": probe_ids}
    )
    for k in range(steps):
        batch, ids = mlp_batch(n=6, seed=k)
        model(**batch, task_ids=ids)["loss"].backward()
        with rec.update(opt):
            opt.step()
        opt.zero_grad()
    rec.close()


def test_a_probe_that_raises_is_skipped_then_switched_off_and_training_goes_on(tmp_path, monkeypatch):
    calls = []

    def broken_probe(model, batch, **kwargs):
        calls.append(1)
        raise NotImplementedError("no per-example gradients for layer FancyAttention")

    monkeypatch.setattr(dynamics.probing, "probe", broken_probe)
    with pytest.warns(DynamicsWarning, match="FancyAttention") as caught:
        _train_probing_every_step(tmp_path / "run", MAX_PROBE_FAILURES + 2)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2  # "skipped, retried" once, then "probes are off" once
    assert "next one is tried" in messages[0] and "probes are off" in messages[1]
    assert len(calls) == MAX_PROBE_FAILURES  # retried, then not any more
    m = load_runs(tmp_path / "run").metrics
    assert sorted(m.loc[m["name"] == "train_loss", "step"]) == list(range(1, MAX_PROBE_FAILURES + 3))


def test_a_probe_that_fails_once_is_skipped_and_later_probes_run(tmp_path, monkeypatch):
    real = dynamics.probing.probe
    calls = []

    def flaky_probe(model, batch, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("transient failure")
        return real(model, batch, **kwargs)

    monkeypatch.setattr(dynamics.probing, "probe", flaky_probe)
    with pytest.warns(DynamicsWarning, match="transient failure"):
        _train_probing_every_step(tmp_path / "run", 3)
    m = load_runs(tmp_path / "run").metrics
    assert sorted(m.loc[m["name"] == "fisher_se", "step"].unique()) == [2, 3]


def _task_grad(model, batch, ids, a):
    out = model(**{k: v[ids == a] for k, v in batch.items()})
    return torch.autograd.grad(out["loss"], [p for p in model.parameters()])


def test_probe_leaves_training_unchanged_and_update_cosine_uses_the_pre_update_point(tmp_path):
    torch.manual_seed(0)
    model = mlp()  # dropout 0.1: any RNG the probe consumed would change later masks
    reference = copy.deepcopy(model)
    theta0 = copy.deepcopy(model)
    probe_batch, probe_ids = mlp_batch(n=9, seed=5)

    def train(net, rec=None):
        torch.manual_seed(1)
        opt = torch.optim.Adam(net.parameters(), lr=0.05)
        losses = []
        for k in range(3):
            batch, ids = mlp_batch(n=6, seed=k)
            loss = net(**batch, task_ids=ids)["loss"] if rec else net(**batch)["loss"]
            loss.backward()
            losses.append(loss.item())
            if rec:
                with rec.update(opt):
                    opt.step()
            else:
                opt.step()
            opt.zero_grad()
        return losses

    rec = LoopRecorder(
        model,
        tasks=TASKS,
        out_dir=tmp_path / "run",
        probe_every=1,
        probe_batch={**probe_batch, "task_ids": probe_ids},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", DynamicsWarning)
        with_probe = train(model, rec)
    rec.close()
    assert with_probe == train(reference)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)

    # Brute force for step 1: task-mean gradients at theta_0 (eval mode), the update theta_1 - theta_0.
    theta1 = copy.deepcopy(theta0)
    torch.manual_seed(1)
    opt = torch.optim.Adam(theta1.parameters(), lr=0.05)
    batch, _ = mlp_batch(n=6, seed=0)
    theta1(**batch)["loss"].backward()
    opt.step()
    delta = torch.cat(
        [(p1 - p0).flatten() for p1, p0 in zip(theta1.parameters(), theta0.parameters(), strict=True)]
    )
    theta0.eval()
    m = load_runs(tmp_path / "run").metrics
    got = m[(m["name"] == "update_cosine") & (m["step"] == 1)].set_index("task")["value"]
    for a, task in enumerate(TASKS):
        g = torch.cat([x.flatten() for x in _task_grad(theta0, probe_batch, probe_ids, a)])
        assert got[task] == pytest.approx(float(g @ delta / (g.norm() * delta.norm())), rel=1e-4, abs=1e-6)
    # the probe's loss on its batch does not overwrite the step's training loss
    names = set(m["name"])
    assert {"probe_loss", "loss", "grad_norm", "fisher_se"} <= names


def test_record_scores_adds_the_multi_task_average_and_parses_eval_keys(tmp_path):
    rec = Recorder(["vqa", "vqa_long", "report"], out_dir=tmp_path / "run")
    rec.record_scores({"vqa": {"acc": 0.5}, "vqa_long": {"acc": 0.25}})
    rec.record_scores({"report": {"acc": 0.75, "bleu": 0.1}})
    rec.close()
    s = load_runs(tmp_path / "run").scores.set_index(["task", "metric"])["value"]
    assert s[("", "acc")] == pytest.approx(0.5)
    assert ("", "bleu") not in s.index  # not reported for every task
    with pytest.raises(ValueError, match="unknown task"):
        Recorder(["a"]).record_scores({"b": {"acc": 1.0}})
    parsed = parse_eval_metrics(
        {
            "eval_vqa_long_acc": 0.2,
            "eval_vqa_acc": 0.3,
            "eval_loss": 1.0,
            "eval_vqa_runtime": 2.0,
            "epoch": 1.0,
        },
        ["vqa", "vqa_long", "report"],
    )
    assert parsed == {"vqa_long": {"acc": 0.2}, "vqa": {"acc": 0.3}}


def test_flat_sharded_parameters_turn_probes_off_with_one_reason():
    # FSDP2, FSDP1 with use_orig_params=True and ZeRO-3 are probed (tests/distributed); FSDP1's flat
    # parameters (use_orig_params=False) hold many layers' shards in one tensor and are not.
    model = mlp()
    first = next(model.parameters())
    first._is_flat_param = True  # what FSDP1 marks its FlatParameter with
    rec = Recorder(TASKS, probe_every=1)
    with pytest.warns(DynamicsWarning, match="sharded by FSDP.*Per-task losses are still recorded"):
        rec.attach_model(model)
    assert not rec.should_probe(1)
    whole = Recorder(TASKS, probe_every=1)
    whole.attach_model(mlp())
    assert whole.should_probe(1)  # an unsharded model keeps its probes


def test_invalid_configuration_is_rejected_with_the_fix():
    with pytest.raises(TypeError, match="list of task names"):
        Recorder("abc")
    with pytest.raises(ValueError, match="unique"):
        Recorder(["a", "a"])
    with pytest.raises(ValueError, match="probe_every must be an integer >= 0"):
        Recorder(["a"], probe_every=-1)
    with pytest.raises(ValueError, match="may not set 'direction'"):
        Recorder(["a"], probe_kwargs={"direction": []})


def test_ddp_wrapped_model_is_probed_through_its_module(tmp_path):
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        inner = mlp()
        ddp = torch.nn.parallel.DistributedDataParallel(inner)
        probe_batch, probe_ids = mlp_batch(n=6, seed=9)
        rec = LoopRecorder(
            ddp,
            tasks=TASKS,
            out_dir=tmp_path / "run",
            probe_every=1,
            probe_batch={**probe_batch, "task_ids": probe_ids},
        )
        assert rec.recorder.model is inner
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DynamicsWarning)
            for k in range(2):
                batch, ids = mlp_batch(n=6, seed=k)
                ddp(**batch, task_ids=ids)["loss"].backward()
                with rec.update(opt):
                    opt.step()
                opt.zero_grad()
        rec.close()
    finally:
        dist.destroy_process_group()
    m = load_runs(tmp_path / "run").metrics
    assert sorted(m.loc[m["name"] == "fisher_se", "step"]) == [1, 2]
    assert sorted(m.loc[m["name"] == "train_loss", "step"]) == [1, 2]
