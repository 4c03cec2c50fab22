"""The recorder's parts: one configuration, per-token task ids, hand-off to the store at each step,
reruns vs resumes, probe rows in the Trainer's logs at their own steps, cumulative warning counts."""

from __future__ import annotations

import dataclasses
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import dynamics
import dynamics.store.writer as writer_module
from dynamics import LoopRecorder, RecorderConfig, load_runs
from dynamics.integrations.recorder import DynamicsWarning, Recorder
from tests.integrations.hook_helpers import TASKS, ItemDataset, store_table, trainer_for
from tests.tiny_models import llama_batch, mlp, mlp_batch, tiny_llama


# ---------------------------------------------------------------------- one configuration
def test_one_config_for_every_adapter_and_unknown_options_name_the_valid_ones(tmp_path):
    pytest.importorskip("transformers")
    cfg = RecorderConfig(tasks=TASKS, probe_every=7, probe_size=5, tags={"seed": 1}, flush_seconds=0.5)
    loop = LoopRecorder(mlp(), config=cfg, out_dir=tmp_path / "loop")
    callback = dynamics.DynamicsCallback(config=cfg, probe_every=3)  # an option replaces a field
    assert loop.recorder.cfg == dataclasses.replace(cfg, out_dir=tmp_path / "loop")
    assert callback.config.probe_every == 3 and callback.config.probe_size == 5 and callback.tasks == TASKS
    batch, ids = llama_batch(n=8, seed=1)
    trainer = trainer_for(tiny_llama(), ItemDataset(batch, ids), tmp_path / "hf")
    attached = dynamics.attach(trainer, tasks=TASKS, config=cfg)
    assert attached.config.flush_seconds == 0.5 and attached.config.tags == {"seed": 1}
    for make in (
        lambda: dynamics.attach(trainer, tasks=TASKS, probe_evry=3),
        lambda: dynamics.DynamicsCallback(TASKS, probe_evry=3),
        lambda: LoopRecorder(mlp(), tasks=TASKS, probe_evry=3),
    ):
        with pytest.raises(TypeError, match=r"unknown dynamics option\(s\) \['probe_evry'\].*probe_every"):
            make()
    with pytest.raises(ValueError, match="flush_seconds"):
        RecorderConfig(tasks=TASKS, flush_seconds=0)
    loop.close()


# ---------------------------------------------------------------------- per-token task ids
def test_per_token_task_ids_count_each_token_for_its_own_task():
    """Packed rows: a causal LM row holding segments of several tasks; reference by explicit loops."""
    gen = torch.Generator().manual_seed(0)
    n, length, vocab = 3, 10, 11
    logits = torch.randn(n, length, vocab, generator=gen)
    labels = torch.randint(0, vocab, (n, length), generator=gen)
    labels[:, 0] = -100
    labels[1, 4] = -100  # a segment start
    token_tasks = torch.tensor(
        [[0] * 4 + [1] * 6, [2] * 4 + [0] * 4 + [-1] * 2, [1] * 10]  # -1: padding, no task
    )
    labels[1, 8:] = -100
    rec = Recorder(TASKS, probe_every=0, loss="causal_lm")
    rec.observe_logits(logits, labels, token_tasks)
    rec.end_step(1)
    logs = rec.logs()
    logp = torch.log_softmax(logits.double(), dim=-1)
    sums, counts, segments = [0.0] * 3, [0] * 3, [set() for _ in range(3)]
    for i in range(n):
        for t in range(length):
            a = int(token_tasks[i, t])
            if a >= 0:
                segments[a].add(i)
            if t + 1 < length and labels[i, t + 1] != -100:
                b = int(token_tasks[i, t + 1])  # the target token's own task
                sums[b] -= float(logp[i, t, labels[i, t + 1]])
                counts[b] += 1
    for a, task in enumerate(TASKS):
        assert logs[f"dynamics/loss/{task}"] == pytest.approx(sums[a] / counts[a], rel=1e-6)
        assert logs[f"dynamics/n_tokens/{task}"] == counts[a]
        assert logs[f"dynamics/n_examples/{task}"] == len(segments[a])  # (row, task) segments
    total = sum(sums) / sum(counts)
    assert logs["dynamics/train_loss"] == pytest.approx(total, rel=1e-6)
    # the same tokens with per-example ids when each row is one task: the two paths agree
    rec2 = Recorder(TASKS, probe_every=0, loss="causal_lm")
    rec2.observe_logits(logits[2:], labels[2:], torch.tensor([1]))
    rec2.end_step(1)
    rec3 = Recorder(TASKS, probe_every=0, loss="causal_lm")
    rec3.observe_logits(logits[2:], labels[2:], token_tasks[2:])
    rec3.end_step(1)
    assert rec2.logs() == pytest.approx(rec3.logs())


def test_per_token_ids_with_shift_labels_follow_the_target_token():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 6), generator=gen)
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
    ids = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 0, 0]])
    a = Recorder(TASKS, probe_every=0, loss="causal_lm")
    a.observe_logits(logits, labels, ids)
    a.end_step(1)
    b = Recorder(TASKS, probe_every=0, loss="causal_lm")
    b.observe_logits(logits, labels, ids, shift_labels=shift)
    b.end_step(1)
    assert a.logs() == pytest.approx(b.logs())


# ---------------------------------------------------------------------- hand-off to the store
def _loop_steps(rec, model, steps, pause=0.0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for k in range(steps):
        batch, ids = mlp_batch(n=6, seed=k)
        model(**batch, task_ids=ids)["loss"].backward()
        with rec.update(opt):
            opt.step()
        opt.zero_grad()
        time.sleep(pause)


def test_rows_reach_disk_within_flush_seconds_without_a_logging_step(tmp_path):
    model = mlp()
    rec = LoopRecorder(model, tasks=TASKS, out_dir=tmp_path / "run", probe_every=0, flush_seconds=0.05)
    _loop_steps(rec, model, 4, pause=0.06)  # no logs(), no close(): only the time bound hands rows over
    _loop_steps(rec, model, 1)
    on_disk = load_runs(tmp_path / "run").metrics  # read while the run is still open
    steps = sorted(on_disk.loc[on_disk["name"] == "train_loss", "step"])
    assert steps[:4] == [1, 2, 3, 4]  # all but (at most) the last flush interval
    rec.close()


def test_each_step_is_handed_to_the_store_at_its_end(tmp_path, monkeypatch):
    # Its durability clock starts there: a long next step cannot hold it back (tests/faults).
    handed: list[int] = []
    monkeypatch.setattr(writer_module, "RunWriter", _SpyWriter)
    monkeypatch.setattr(_SpyWriter, "log_many", lambda self, steps, *a: handed.extend(int(s) for s in steps))
    model = mlp()
    rec = LoopRecorder(model, tasks=TASKS, out_dir=tmp_path / "run", probe_every=0)
    for k in range(1, 4):
        _loop_steps(rec, model, 1)
        assert sorted(set(handed)) == list(range(1, k + 1))
    rec.close()


def test_logging_steps_write_no_part_of_their_own(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(writer_module.RunWriter, "request_flush", lambda self: calls.append(1), raising=False)
    model = mlp()
    rec = LoopRecorder(model, tasks=TASKS, out_dir=tmp_path / "run", probe_every=0, flush_seconds=60)
    for _ in range(3):
        _loop_steps(rec, model, 1)
        rec.logs()  # logging every step: the store's clock, not the logging step, decides the writes
    assert calls == []
    assert not list((tmp_path / "run" / "metrics").glob("*.parquet"))
    rec.close()
    assert len(list((tmp_path / "run" / "metrics").glob("*.parquet"))) == 1
    assert sorted(set(store_table(tmp_path / "run", "train_loss").index)) == [1, 2, 3]


def test_a_trainer_logging_every_step_writes_one_part_per_flush_interval(tmp_path):
    pytest.importorskip("transformers")
    batch, ids = llama_batch(n=48, seed=1)
    trainer = trainer_for(tiny_llama(), ItemDataset(batch, ids), tmp_path, max_steps=12, logging_steps=1)
    dynamics.attach(trainer, tasks=TASKS, probe_every=0, flush_seconds=120)
    trainer.train()  # seconds, well inside one flush interval
    assert len(list((tmp_path / "dynamics" / "metrics").glob("*.parquet"))) == 1  # at the end, not 12
    assert sorted(set(store_table(tmp_path / "dynamics", "train_loss").index)) == list(range(1, 13))


# ---------------------------------------------------------------------- reruns and resumes
class _SpyWriter:
    """Records how the recorder opens the store (the store branch's RunWriter signature)."""

    opened: list[dict] = []

    def __init__(self, run_dir, *, tasks, tags=None, meta=None, run_id=None, resume_step=None,
                 overwrite=False, append=False, flush_seconds=5.0):  # fmt: skip
        type(self).opened.append(
            {"resume_step": resume_step, "overwrite": overwrite, "flush_seconds": flush_seconds}
        )

    def log_many(self, *a, **k): ...
    def log_scores(self, *a, **k): ...
    def request_flush(self): ...
    def flush(self): ...
    def close(self): ...


def test_resume_step_only_on_a_real_resume_and_overwrite_from_the_config(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    batch, ids = llama_batch(n=24, seed=1)
    data = ItemDataset(batch, ids)
    first = trainer_for(tiny_llama(), data, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    dynamics.attach(first, tasks=TASKS, probe_every=0)
    first.train()
    monkeypatch.setattr(writer_module, "RunWriter", _SpyWriter)
    _SpyWriter.opened = []
    resumed = trainer_for(tiny_llama(), data, tmp_path, max_steps=3)
    dynamics.attach(resumed, tasks=TASKS, probe_every=0, flush_seconds=2.0)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    rerun = trainer_for(tiny_llama(), data, tmp_path, max_steps=1)
    dynamics.attach(rerun, tasks=TASKS, probe_every=0, overwrite=True)
    rerun.train()
    loop = LoopRecorder(mlp(), tasks=TASKS, out_dir=tmp_path / "loop", start_step=5)
    loop.close()
    assert _SpyWriter.opened == [
        {"resume_step": 2, "overwrite": False, "flush_seconds": 2.0},
        {"resume_step": None, "overwrite": True, "flush_seconds": 5.0},
        {"resume_step": 5, "overwrite": False, "flush_seconds": 5.0},
    ]


@pytest.mark.skipif(
    not hasattr(writer_module, "RunExistsError"), reason="the store does not raise RunExistsError yet"
)
def test_a_new_training_into_an_existing_run_is_refused_before_the_first_step(tmp_path):
    batch, ids = llama_batch(n=24, seed=1)
    data = ItemDataset(batch, ids)
    first = trainer_for(tiny_llama(), data, tmp_path, max_steps=2)
    dynamics.attach(first, tasks=TASKS, probe_every=0)
    first.train()
    before = load_runs(tmp_path / "dynamics").metrics
    again = trainer_for(tiny_llama(), data, tmp_path, max_steps=2)
    dynamics.attach(again, tasks=TASKS, probe_every=0)
    with pytest.raises(
        writer_module.RunExistsError,
        match="(?s)resume_from_checkpoint.*overwrite|overwrite.*resume_from_checkpoint",
    ):
        again.train()
    assert again.state.global_step == 0  # refused before the first step
    assert load_runs(tmp_path / "dynamics").metrics.equals(before)  # nothing of the old run lost


# ---------------------------------------------------------------------- logs at the right steps
def test_probe_rows_reach_every_reporter_with_their_own_step(tmp_path):
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):  # stands in for TensorBoard / wandb / mlflow
        def __init__(self):
            self.seen: list[tuple[int, dict]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append((state.global_step, dict(logs or {})))

    batch, ids = llama_batch(n=40, seed=1)
    reporter = Reporter()
    trainer = trainer_for(tiny_llama(), ItemDataset(batch, ids), tmp_path, max_steps=5, logging_steps=4,
                          callbacks=[reporter])  # fmt: skip
    dynamics.attach(trainer, tasks=TASKS, probe_every=1, probe_size=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DynamicsWarning)
        trainer.train()
    probe_steps = [step for step, logs in reporter.seen if "dynamics/fisher_se" in logs]
    assert probe_steps == [1, 2, 3, 4, 5]  # every probe, none dropped between logging steps (4)
    stored = store_table(tmp_path / "dynamics", "fisher_se")
    for step, logs in reporter.seen:
        if "dynamics/fisher_se" in logs:
            assert logs["dynamics/fisher_se"] == pytest.approx(float(stored.loc[step].iloc[0]))
    loss_steps = [step for step, logs in reporter.seen if "dynamics/loss/a" in logs]
    assert loss_steps == [4]  # per-task losses ride on the Trainer's own logging steps


# ---------------------------------------------------------------------- warnings count over the run
def test_out_of_range_warning_counts_over_the_run(tmp_path):
    model = mlp()
    rec = LoopRecorder(model, tasks=TASKS, out_dir=tmp_path / "run", probe_every=0, flush_seconds=1e-6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(DynamicsWarning) as caught:
        for k in range(8):
            batch, ids = mlp_batch(n=6, seed=k)
            bad = ids.clone()
            bad[: 1 + k % 3] = 9  # 1, 2 or 3 of 6 examples per step out of range
            model(**batch, task_ids=bad)["loss"].backward()
            with rec.update(opt):
                opt.step()
            opt.zero_grad()
        rec.close()
    dropped = sum(1 + k % 3 for k in range(8))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "dropped 1 of 6 training examples over the run so far (the first at step 1)" in messages[0]
    assert f"dropped {dropped} of 48 training examples over the run (the first at step 1)" in messages[1]
    assert rec.recorder.problems["task_id_range"] == dropped


# ---------------------------------------------------------------------- the TRL hand-over
def test_attach_hands_trainers_with_a_trl_class_to_the_trl_adapter(tmp_path, monkeypatch):
    from transformers import Trainer

    import dynamics.integrations.trl as trl_adapter

    batch, ids = llama_batch(n=8, seed=1)
    data = ItemDataset(batch, ids)
    FakeSFT = type("SFTTrainer", (Trainer,), {"__module__": "trl.trainer.sft_trainer"})
    UserSFT = type("MySFT", (FakeSFT,), {"__module__": "my_project.train"})  # a user's subclass
    calls = []
    monkeypatch.setattr(trl_adapter, "adapt", lambda trainer, callback: calls.append((trainer, callback)))
    trainer = trainer_for(tiny_llama(), data, tmp_path / "a", trainer_cls=FakeSFT)
    callback = dynamics.attach(trainer, tasks=TASKS, probe_every=0)
    assert calls == [(trainer, callback)]
    plain = trainer_for(tiny_llama(), data, tmp_path / "b")
    dynamics.attach(plain, tasks=TASKS, probe_every=0)
    assert len(calls) == 1  # only TRL trainers
    sub = trainer_for(tiny_llama(), data, tmp_path / "c", trainer_cls=UserSFT)
    dynamics.attach(sub, tasks=TASKS, probe_every=0)
    assert len(calls) == 2 and calls[1][0] is sub
