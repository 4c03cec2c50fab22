"""The HF Trainer callback: exactness against the Trainer's own loss, TensorBoard, eval, resume, bad input."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

import dynamics
import dynamics.probing
from dynamics import load_runs
from dynamics.integrations.recorder import DynamicsWarning
from tests.integrations.hook_helpers import (
    TASKS,
    ItemDataset,
    hf_task_losses,
    logged_losses,
    store_table,
    trainer_for,
)
from tests.tiny_models import llama_batch, llava_batch, lora_llama, tiny_llama, tiny_llava

pytest.importorskip("transformers")

FAMILIES = {
    "llama_tied": (lambda: tiny_llama(tie_word_embeddings=True), llama_batch),
    "llava": (tiny_llava, llava_batch),
    "lora_llama": (lora_llama, llama_batch),
}


def _data(make, n=24, seed=1, **kw):
    batch, ids = make(n=n, seed=seed)
    return batch, ids, ItemDataset(batch, ids, **kw)


def _weighted_mean(run_dir: Path) -> dict[int, float]:
    loss, tokens = store_table(run_dir, "loss"), store_table(run_dir, "n_tokens")
    return ((loss * tokens[loss.columns]).sum(axis=1) / tokens.sum(axis=1)).to_dict()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_weighted_task_losses_equal_the_trainers_logged_loss(tmp_path, family):
    build, make = FAMILIES[family]
    model = build()
    batch, ids, data = _data(make)
    initial = copy.deepcopy(model)
    trainer = trainer_for(model, data, tmp_path, gradient_accumulation_steps=2)
    dynamics.attach(trainer, tasks=TASKS, probe_every=2, probe_size=6)
    trainer.train()
    logged = logged_losses(trainer)
    mean = _weighted_mean(tmp_path / "dynamics")
    assert sorted(mean) == sorted(logged) == [1, 2, 3]
    for step, value in logged.items():
        assert f"{mean[step]:.4g}" == f"{value:.4g}"  # to the digits the Trainer prints
        assert mean[step] == pytest.approx(value, rel=1e-5)
    loss, n = store_table(tmp_path / "dynamics", "loss"), store_table(tmp_path / "dynamics", "n_tokens")
    assert ((n > 0) == loss.reindex_like(n).notna()).all().all()  # a loss wherever a task has examples
    if family != "lora_llama":  # LoRA dropout makes the training forward differ from an eval reference
        # Step 1 = examples 0..7 (two micro-batches of 4) at the initial weights: per task, transformers'
        # own loss on that task's examples alone.
        ref = hf_task_losses(initial, {k: v[:8] for k, v in batch.items()}, ids[:8])
        got = store_table(tmp_path / "dynamics", "loss").loc[1]
        for task, value in ref.items():
            assert got[task] == pytest.approx(value, rel=1e-5)


def test_bf16_autocast_with_gradient_checkpointing(tmp_path):
    batch, ids, data = _data(llama_batch)
    trainer = trainer_for(tiny_llama(), data, tmp_path, bf16=True, activation_checkpointing=True)
    dynamics.attach(trainer, tasks=TASKS, probe_every=3, probe_size=6)
    trainer.train()
    mean = _weighted_mean(tmp_path / "dynamics")
    for step, value in logged_losses(trainer).items():
        assert mean[step] == pytest.approx(value, rel=1e-5)
    assert not store_table(tmp_path / "dynamics", "grad_norm").empty  # the probe ran at step 3


def test_tensorboard_event_files_hold_the_dynamics_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, data = _data(llama_batch)
    trainer = trainer_for(tiny_llama(), data, tmp_path, report_to="tensorboard")
    dynamics.attach(trainer, tasks=TASKS, probe_every=2, probe_size=6)
    trainer.train()
    events = list(tmp_path.rglob("events.out.tfevents.*"))  # <output_dir>/runs/<date>
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    loss = store_table(tmp_path / "dynamics", "loss")
    for task in TASKS:
        tb = {e.step: e.value for e in acc.Scalars(f"train/dynamics/loss/{task}")}
        assert tb == pytest.approx(loss[task].dropna().to_dict(), rel=1e-6)
    assert {
        "train/dynamics/grad_cosine/a|b",
        "train/dynamics/fisher_se",
        "train/dynamics/update_cosine/a",
    } <= tags
    assert "custom_scalars__config__" in acc.Tags()["tensors"]  # one chart per signal, all tasks in it


def test_probes_do_not_change_training(tmp_path):
    _, _, data = _data(llama_batch)

    def run(out, attach):
        model = lora_llama()  # LoRA dropout 0.1: an RNG draw or a mode left on eval would show
        trainer = trainer_for(model, data, out, max_steps=4)
        if attach:
            dynamics.attach(trainer, tasks=TASKS, probe_every=1, probe_size=6)
        trainer.train()
        return logged_losses(trainer), {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    with warnings.catch_warnings():
        warnings.simplefilter("error", DynamicsWarning)
        losses_with, weights_with = run(tmp_path / "with", True)
    losses_without, weights_without = run(tmp_path / "without", False)
    assert losses_with == losses_without
    for name, value in weights_without.items():
        assert torch.equal(weights_with[name], value), name
    assert sorted(store_table(tmp_path / "with" / "dynamics", "update_cosine").index) == [1, 2, 3, 4]


def _token_accuracy(pred) -> dict[str, float]:
    """compute_metrics for a causal LM: next-token accuracy on the supervised positions."""
    logits, labels = pred.predictions, pred.label_ids
    hit = (logits[:, :-1].argmax(-1) == labels[:, 1:])[labels[:, 1:] != -100]
    return {"accuracy": float(hit.mean())}


def test_every_evaluation_is_a_per_task_curve_and_the_last_one_the_final_score(tmp_path):
    batch, ids, data = _data(llama_batch)
    held_out, held_ids = llama_batch(n=12, seed=7)
    one_eval_set = ItemDataset(held_out, held_ids)  # one set with a task_ids column, split per task
    trainer = trainer_for(
        tiny_llama(), data, tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2,
        eval_dataset=dynamics.split_by_task(one_eval_set, TASKS), compute_metrics=_token_accuracy,
    )  # fmt: skip
    dynamics.attach(trainer, tasks=TASKS, probe_every=2, probe_size=6)
    trainer.train()
    history = trainer.state.log_history
    runs = load_runs(tmp_path / "dynamics")
    curves = store_table(tmp_path / "dynamics", "eval_loss")
    accuracy = store_table(tmp_path / "dynamics", "eval_accuracy")
    for t in TASKS:
        logged = {h["step"]: h[f"eval_{t}_loss"] for h in history if f"eval_{t}_loss" in h}
        assert sorted(logged) == [2, 4]
        assert curves[t].dropna().to_dict() == pytest.approx(logged)  # a curve: every evaluation, at its step
        acc = {h["step"]: h[f"eval_{t}_accuracy"] for h in history if f"eval_{t}_accuracy" in h}
        assert accuracy[t].dropna().to_dict() == pytest.approx(acc)
    scores = runs.scores.set_index(["task", "metric"])["value"]
    last = {t: [h[f"eval_{t}_accuracy"] for h in history if f"eval_{t}_accuracy" in h][-1] for t in TASKS}
    for t in TASKS:
        assert scores[(t, "accuracy")] == pytest.approx(last[t])
    assert scores[("", "accuracy")] == pytest.approx(sum(last.values()) / 3)
    assert not any(
        m.endswith("loss") for m in scores.index.get_level_values("metric")
    )  # a loss is never a score
    assert ("a", "runtime") not in scores.index
    assert scores.notna().all()
    n_examples = store_table(tmp_path / "dynamics", "n_examples").sum(axis=1)
    assert n_examples.tolist() == [4.0] * 4  # eval forwards (12 examples at steps 2, 4) are not training


def test_evaluate_per_task_from_one_eval_set(tmp_path):
    _, _, data = _data(llama_batch)
    held_out, held_ids = llama_batch(n=12, seed=7)
    trainer = trainer_for(tiny_llama(), data, tmp_path, max_steps=2)
    callback = dynamics.attach(trainer, tasks=TASKS, probe_every=0)
    trainer.train()
    metrics = dynamics.evaluate_per_task(trainer, ItemDataset(held_out, held_ids))
    callback.close()  # the evaluation's rows are on disk at the latest now (or within flush_seconds)
    assert {f"eval_{t}_loss" for t in TASKS} <= set(metrics)
    curve = store_table(tmp_path / "dynamics", "eval_loss")
    assert curve.loc[2].to_dict() == pytest.approx({t: metrics[f"eval_{t}_loss"] for t in TASKS})


def test_resume_from_checkpoint_keeps_each_step_once(tmp_path):
    _, _, data = _data(llama_batch)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2)
    first = trainer_for(tiny_llama(), data, tmp_path, **common)
    dynamics.attach(first, tasks=TASKS, probe_every=2, probe_size=6)
    first.train()
    before = load_runs(tmp_path / "dynamics").metrics
    resumed = trainer_for(tiny_llama(seed=3), data, tmp_path, **common)
    dynamics.attach(resumed, tasks=TASKS, probe_every=2, probe_size=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    runs = load_runs(tmp_path / "dynamics")
    after = runs.metrics
    assert len(runs.runs) == 1
    assert not after.duplicated(["step", "name", "task", "task_b"]).any()
    assert sorted(after.loc[after["name"] == "train_loss", "step"]) == [1, 2, 3, 4]
    merged = before.merge(after, on=["step", "name", "task", "task_b"], suffixes=("_first", "_resumed"))
    assert len(merged) == len(before)
    assert merged["value_first"].tolist() == pytest.approx(merged["value_resumed"].tolist(), rel=1e-5)


def test_callback_passed_to_the_trainer_and_bound_goes_first(tmp_path):
    _, _, data = _data(llama_batch)
    callback = dynamics.DynamicsCallback(TASKS, probe_every=0)
    trainer = trainer_for(tiny_llama(), data, tmp_path, callbacks=[callback])
    callback.bind(trainer)  # the explicit handle (what attach does); no stack walking
    assert trainer.callback_handler.callbacks[0] is callback  # first, so its log keys reach every reporter
    assert trainer.callback_handler.callbacks.count(callback) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", DynamicsWarning)
        trainer.train()  # remove_unused_columns=True: task_ids must survive the column filter
    mean = _weighted_mean(tmp_path / "dynamics")
    for step, value in logged_losses(trainer).items():
        assert mean[step] == pytest.approx(value, rel=1e-5)


def test_unbound_callback_still_records_losses_and_says_how_to_attach(tmp_path):
    _, _, data = _data(llama_batch)
    callback = dynamics.DynamicsCallback(TASKS, probe_every=0)
    trainer = trainer_for(tiny_llama(), data, tmp_path, callbacks=[callback])
    with pytest.warns(DynamicsWarning, match="dynamics.attach"):
        trainer.train()
    mean = _weighted_mean(tmp_path / "dynamics")
    for step, value in logged_losses(trainer).items():
        assert mean[step] == pytest.approx(value, rel=1e-5)


def test_batches_without_task_ids_warn_once_and_training_completes(tmp_path):
    _, _, data = _data(llama_batch, with_task_ids=False)
    trainer = trainer_for(tiny_llama(), data, tmp_path, max_steps=3)
    dynamics.attach(trainer, tasks=TASKS, probe_every=2, probe_size=6)
    with pytest.warns(DynamicsWarning) as caught:
        trainer.train()
    texts = [str(w.message) for w in caught]
    assert sum("no 'task_ids'" in t for t in texts) == 1
    assert len(logged_losses(trainer)) == 3  # training itself went on
    m = load_runs(tmp_path / "dynamics").metrics
    assert "loss" not in set(m["name"]) and sorted(m.loc[m["name"] == "lr", "step"]) == [1, 2, 3]


def test_a_raising_probe_in_the_trainer_is_reported_and_training_goes_on(tmp_path, monkeypatch):
    def broken_probe(*args, **kwargs):
        raise NotImplementedError("unsupported layer: Conv3d")

    monkeypatch.setattr(dynamics.probing, "probe", broken_probe)
    _, _, data = _data(llama_batch)
    trainer = trainer_for(tiny_llama(), data, tmp_path, max_steps=4)
    dynamics.attach(trainer, tasks=TASKS, probe_every=1, probe_size=6)
    with pytest.warns(DynamicsWarning, match="Conv3d") as caught:
        trainer.train()
    # skipped and retried (one message), then switched off (one message); never once per step
    assert len([w for w in caught if "probe" in str(w.message)]) == 2
    assert sorted(store_table(tmp_path / "dynamics", "loss").index) == [1, 2, 3, 4]
