"""Trainers beyond the plain Trainer: Seq2SeqTrainer with generation during evaluation, task names
as task_ids (lists of dicts, torch datasets, datasets.Dataset), the token-weighted-mean identity."""

from __future__ import annotations

import runpy
import warnings
from pathlib import Path

import pytest
import torch

import dynamics
from dynamics import load_runs
from dynamics.integrations.recorder import DynamicsWarning
from tests.integrations.hook_helpers import TASKS, ItemDataset, logged_losses, store_table, trainer_for
from tests.tiny_models import llama_batch, tiny_llama

pytest.importorskip("transformers")

HOOKS = Path(__file__).resolve().parents[2] / "hooks"
S2S = runpy.run_path(str(HOOKS / "seq2seq.py"))


def _weighted_mean(run_dir: Path) -> dict[int, float]:
    loss, tokens = store_table(run_dir, "loss"), store_table(run_dir, "n_tokens")
    return ((loss * tokens[loss.columns]).sum(axis=1) / tokens.sum(axis=1)).to_dict()


def _printed(value: float) -> str:
    return f"{value:.4g}"  # what the Trainer prints for a logged float


# accum=1 only: under gradient accumulation transformers 5 passes num_items_in_batch to T5 (its
# forward takes **kwargs) but T5's loss ignores it and averages per micro-batch, so the Trainer logs
# the SUM of the micro-batch means (2x the loss at accum=2): no per-task decomposition can equal that.
@pytest.mark.parametrize("accum", [1])
def test_seq2seq_trainer_with_generation_during_evaluation(tmp_path, accum):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    tasks = S2S["TASKS"]
    data = S2S["Seq2SeqData"](48, seed=0)  # task NAMES in task_ids
    evaluation = S2S["Seq2SeqData"](9, seed=1)
    trainer = trainer_for(
        S2S["build_t5"](0), data, tmp_path, trainer_cls=Seq2SeqTrainer, args_cls=Seq2SeqTrainingArguments,
        max_steps=4, gradient_accumulation_steps=accum, eval_strategy="steps", eval_steps=2,
        predict_with_generate=True, generation_max_length=8, compute_metrics=S2S["exact_match"],
        eval_dataset=dynamics.split_by_task(evaluation, tasks),
    )  # fmt: skip
    trainer.data_collator = S2S["collate"]
    dynamics.attach(trainer, tasks=tasks, probe_every=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DynamicsWarning)
        trainer.train()  # generate() during evaluation: task_ids must never reach it
    run = tmp_path / "dynamics"
    logged = logged_losses(trainer)
    mean = _weighted_mean(run)
    assert sorted(mean) == sorted(logged) == [1, 2, 3, 4]
    for step, value in logged.items():
        assert _printed(mean[step]) == _printed(value)
        assert mean[step] == pytest.approx(value, rel=1e-5)
    # every task has a loss on every step where it has examples (4 x accum examples per step, 3 tasks)
    loss, n = store_table(run, "loss"), store_table(run, "n_examples")
    assert ((n > 0) == loss.reindex_like(n).notna()).all().all()
    curve = store_table(run, "eval_exact_match")
    assert sorted(curve.index) == [2, 4] and sorted(curve.columns) == sorted(tasks)
    scores = load_runs(run).scores.set_index(["task", "metric"])["value"]
    assert {(t, "exact_match") for t in tasks} <= set(scores.index)


def test_seq2seq_per_task_losses_equal_t5_on_each_tasks_examples(tmp_path):
    import copy

    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    tasks = S2S["TASKS"]
    data = S2S["Seq2SeqData"](24, seed=0, names=False)
    model = S2S["build_t5"](0)
    initial = copy.deepcopy(model)
    trainer = trainer_for(
        model, data, tmp_path, trainer_cls=Seq2SeqTrainer, args_cls=Seq2SeqTrainingArguments, max_steps=1,
        per_device_train_batch_size=6,
    )  # fmt: skip
    trainer.data_collator = S2S["collate"]
    dynamics.attach(trainer, tasks=tasks, probe_every=0)
    trainer.train()
    got = store_table(tmp_path / "dynamics", "loss").loc[1]
    batch = S2S["collate"]([data[i] for i in range(6)])
    ids = batch.pop("task_ids")
    initial.eval()
    with torch.no_grad():
        for a, task in enumerate(tasks):
            rows = ids == a
            ref = initial(**{k: v[rows] for k, v in batch.items()}).loss  # T5's own (aligned) token loss
            assert got[task] == pytest.approx(float(ref), rel=1e-5)


def test_seq2seq_recipe(tmp_path):
    run_dir = runpy.run_path(str(HOOKS / "seq2seq.py"))["main"](
        ["--out", str(tmp_path), "--steps", "4", "--eval-every", "2", "--probe-every", "2"]
    )
    m = load_runs(run_dir).metrics
    assert sorted(m.loc[m["name"] == "train_loss", "step"]) == [1, 2, 3, 4]
    assert sorted(m.loc[m["name"] == "eval_loss", "step"].unique()) == [2, 4]
    # T5 is probed from the Trainer's batch (decoder inputs built from the labels)
    assert sorted(m.loc[m["name"] == "fisher_se", "step"]) == [2, 4]
    assert m.loc[m["name"] == "update_cosine", "value"].notna().all()


def _name_datasets():
    batch, ids = llama_batch(n=24, seed=1)
    by_index = ItemDataset(batch, ids)
    names = [{**item, "task_ids": TASKS[item["task_ids"]]} for item in by_index.items]
    return by_index, names


@pytest.mark.parametrize("form", ["list_of_dicts", "datasets.Dataset"])
def test_task_names_as_task_ids_record_the_same_losses_as_indices(tmp_path, form):
    by_index, names = _name_datasets()
    if form == "datasets.Dataset":
        datasets = pytest.importorskip("datasets")
        data = datasets.Dataset.from_list([{k: v.tolist() if hasattr(v, "tolist") else v for k, v in d.items()}
                                           for d in names]).with_format("torch", columns=["input_ids", "attention_mask", "labels"], output_all_columns=True)  # fmt: skip
    else:
        data = names

    def run(dataset, out):
        trainer = trainer_for(tiny_llama(), dataset, out, max_steps=3)
        dynamics.attach(trainer, tasks=TASKS, probe_every=3, probe_size=6)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DynamicsWarning)
            trainer.train()
        return store_table(out / "dynamics", "loss"), store_table(out / "dynamics", "grad_norm")

    loss_names, probe_names = run(data, tmp_path / "names")
    loss_index, probe_index = run(by_index, tmp_path / "index")
    import pandas as pd

    pd.testing.assert_frame_equal(loss_names, loss_index, rtol=1e-6)
    assert loss_names.notna().sum().sum() == 8  # task c has no example at step 2
    assert not probe_names.empty  # the probe batch was drawn from names too


def test_an_undeclared_task_name_is_reported_with_the_declared_ones(tmp_path):
    _, names = _name_datasets()
    names[0] = {**names[0], "task_ids": "summarise"}
    trainer = trainer_for(tiny_llama(), names, tmp_path, max_steps=1)
    dynamics.attach(trainer, tasks=TASKS, probe_every=0)
    with pytest.raises(ValueError, match="'summarise'.*not one of the declared tasks"):
        trainer.train()


def test_update_inside_backward_as_deepspeed_does_is_probed_at_the_pre_update_weights(tmp_path):
    """DeepSpeed ZeRO-1/2 (accelerate) runs engine.step() inside the last micro-batch's backward, before
    the Trainer's on_pre_optimizer_step: the probe must still see theta_{s-1} and the real update."""
    from transformers import Trainer

    class UpdateInBackward(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            type(self._real).step(self._real)  # the update, inside "backward"
            self._real.zero_grad()
            return loss

        def create_optimizer(self, model=None):
            real = super().create_optimizer(model)
            self._real = real
            real.step = lambda *a, **k: (
                None
            )  # the Trainer's own optimizer.step() is a no-op, as under DeepSpeed
            return real

    batch, ids = llama_batch(n=16, seed=1)
    data = ItemDataset(batch, ids)
    runs = {}
    for name, cls in (("plain", Trainer), ("in_backward", UpdateInBackward)):
        trainer = trainer_for(
            tiny_llama(), data, tmp_path / name, trainer_cls=cls, max_steps=2, max_grad_norm=0
        )
        dynamics.attach(trainer, tasks=TASKS, probe_every=1, probe_size=6)
        trainer.train()
        runs[name] = load_runs(tmp_path / name / "dynamics").metrics.set_index(
            ["step", "name", "task", "task_b"]
        )
    for metric in ("grad_norm", "update_cosine", "fisher_se"):
        a = runs["plain"].xs(metric, level="name")["value"].sort_index()
        b = runs["in_backward"].xs(metric, level="name")["value"].sort_index()
        assert len(a) > 0 and a.tolist() == pytest.approx(b.tolist(), rel=1e-5), metric
