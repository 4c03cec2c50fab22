"""TRL trainers with the two documented lines: per-task losses equal the trainer's own loss.

Every case builds a tiny Llama from a config and a word-level tokenizer from the test's own words
(no downloads), trains a few steps with sequential batches, and checks, at every logging step,
that the token-weighted mean of the stored per-task losses is the loss the trainer logged, that
every task present in a step's examples has a loss at that step, and, at step 1 (initial weights),
each task's loss against a reference computed here from the model's logits, one example at a time.
"""

from __future__ import annotations

import copy
import runpy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

import dynamics  # noqa: E402
import dynamics.integrations.trl  # noqa: E402,F401  (teaches SFTTrainer to pack task ids)
from dynamics.integrations.recorder import DynamicsWarning  # noqa: E402
from tests.integrations.hook_helpers import (  # noqa: E402
    logged_losses,
    run_settings,
    store_table,
    token_losses,
)

TASKS = ["count", "color", "greet"]
WORDS = "one two three four five six red blue green pink gray hello hi hey bye yo".split()
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]
# Assistant turns inside {% generation %} so that assistant_only_loss can mask the rest.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {% generation %}"
    "{{ m['content'] }} <eos> {% endgeneration %}{% else %}<|user|> {{ m['content'] }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
HOOKS = Path(__file__).resolve().parents[2] / "hooks"


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def _phrase(task: int, i: int) -> str:
    group = WORDS[6 * task : 6 * task + 6] if task < 2 else WORDS[12:]
    return " ".join(group[(i + k) % len(group)] for k in range(2 + i % 4))


def rows(kind: str, n: int = 24, names: bool = False) -> list[dict[str, Any]]:
    """``n`` examples cycling through the tasks (ids as ints, or as task names)."""
    out = []
    for i in range(n):
        task = i % len(TASKS)
        tid: Any = TASKS[task] if names else task
        a, b = _phrase(task, i), _phrase(task, i + 1)
        if kind == "text":
            out.append({"text": f"{a} {b}", "task_ids": tid})
        elif kind == "prompt_completion":
            out.append({"prompt": a, "completion": " " + b, "task_ids": tid})
        elif kind == "chat":
            messages = [{"role": "user", "content": a}, {"role": "assistant", "content": b}]
            out.append({"messages": messages, "task_ids": tid})
        elif kind == "preference":
            other = _phrase((task + 1) % len(TASKS), i)
            out.append({"prompt": a, "chosen": " " + b, "rejected": " " + other, "task_ids": tid})
    return out


def sft(out: Path, kind: str, *, names: bool = False, peft: bool = False, **config: Any):
    from trl import SFTConfig, SFTTrainer

    settings: dict[str, Any] = dict(
        **run_settings(out),
        gradient_accumulation_steps=2,
        max_length=24,
        bf16=False,  # SFTConfig's default autocasts to bf16, also on CPU; the float32 reference needs float32
        seed=0,
    )
    settings.update(config)
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return SFTTrainer(
        model=model(),
        args=SFTConfig(**settings),
        train_dataset=Dataset.from_list(rows(kind, names=names)),
        processing_class=tokenizer(),
        peft_config=peft_config,
    )


def _weighted_mean(run_dir: Path) -> dict[int, float]:
    loss, tokens = store_table(run_dir, "loss"), store_table(run_dir, "n_tokens")
    return ((loss * tokens[loss.columns]).sum(axis=1) / tokens.sum(axis=1)).to_dict()


def _step_rows(trainer, step: int) -> list[dict[str, Any]]:
    """The prepared rows of optimizer step ``step`` (sequential sampling, no wrap in 3 steps)."""
    per_step = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    data = trainer.train_dataset
    return [data[i % len(data)] for i in range((step - 1) * per_step, step * per_step)]


def _task_of(value: Any) -> int:
    return TASKS.index(value) if isinstance(value, str) else int(value)


def _tasks_in(rows_: list[dict[str, Any]]) -> set[str]:
    out = set()
    for row in rows_:
        ids = row["task_ids"] if isinstance(row["task_ids"], list) else [row["task_ids"]]
        out |= {TASKS[_task_of(v)] for v in ids}
    return out


def _examples(rows_: list[dict[str, Any]]) -> list[tuple[list[int], list[int], int]]:
    """(input_ids, labels, task) of every original example in ``rows_`` (packed rows split by seq_lengths)."""
    out = []
    for row in rows_:
        if "seq_lengths" not in row:
            out.append((row["input_ids"], row["labels"], _task_of(row["task_ids"])))
            continue
        start = 0
        for n in row["seq_lengths"]:
            ids = row["task_ids"][start : start + n]
            assert len(set(ids)) == 1, "a packed example spans two tasks"
            out.append(
                (row["input_ids"][start : start + n], row["labels"][start : start + n], _task_of(ids[0]))
            )
            start += n
    return out


def _reference_step_losses(initial, rows_) -> dict[str, float]:
    """Per-task loss of the step's examples at the initial weights, each example run alone."""
    sums, counts = [0.0] * len(TASKS), [0] * len(TASKS)
    initial.eval()
    with torch.no_grad():
        for input_ids, labels, task in _examples(rows_):
            logits = initial(input_ids=torch.tensor([input_ids])).logits[:, :-1]
            s, n = token_losses(logits, torch.tensor([labels[1:]]))
            sums[task] += s[0]
            counts[task] += n[0]
    return {TASKS[a]: sums[a] / counts[a] for a in range(len(TASKS)) if counts[a]}


def _check(trainer, initial=None) -> None:
    run_dir = Path(trainer.args.output_dir) / "dynamics"
    logged = logged_losses(trainer)
    mean = _weighted_mean(run_dir)
    assert sorted(mean) == sorted(logged) == [1, 2, 3]
    for step, value in logged.items():
        assert mean[step] == pytest.approx(value, rel=1e-5)
    losses = store_table(run_dir, "loss")
    for step in logged:
        present = _tasks_in(_step_rows(trainer, step))
        assert present == {
            t for t in TASKS if t in losses.columns and losses.loc[step, t] == losses.loc[step, t]
        }
    if initial is not None:
        got = losses.loc[1]
        for task, value in _reference_step_losses(initial, _step_rows(trainer, 1)).items():
            assert got[task] == pytest.approx(value, rel=1e-5)


@pytest.mark.parametrize(
    ("kind", "config", "names"),
    [
        ("text", {}, False),
        ("prompt_completion", {}, True),  # completion-only loss, task names as strings
        ("chat", {"assistant_only_loss": True}, False),
        ("text", {"packing": True, "max_length": 16}, True),  # bfd packing: padding-free rows
        ("text", {"padding_free": True, "max_length": None}, False),  # no packing, one flat row
        ("text", {"bf16": True}, False),  # TRL's default bf16 autocast (no float32 reference then)
    ],
    ids=["text", "prompt_completion", "chat_assistant_only", "packing", "padding_free", "bf16"],
)
def test_sft_task_losses_equal_the_trainers_logged_loss(tmp_path, kind, config, names):
    trainer = sft(tmp_path, kind, names=names, **config)
    initial = copy.deepcopy(trainer.model)
    initial.__dict__.pop("forward", None)  # TRL's fused forward closes over the original model
    assert "task_ids" in trainer.train_dataset.column_names
    dynamics.attach(trainer, tasks=TASKS, probe_every=0)
    trainer.train()
    _check(trainer, None if trainer.args.bf16 else initial)


def test_sft_with_lora(tmp_path):
    trainer = sft(tmp_path, "prompt_completion", peft=True)
    dynamics.attach(trainer, tasks=TASKS, probe_every=0)
    trainer.train()
    _check(trainer)  # LoRA starts at B = 0: the base model's losses, so the reference holds too
    assert store_table(tmp_path / "dynamics", "loss").notna().all().all()


def test_sft_probes_run_on_unpacked_data(tmp_path):
    trainer = sft(tmp_path, "text")
    dynamics.attach(trainer, tasks=TASKS, probe_every=2, probe_size=6)
    trainer.train()
    _check(trainer)
    assert sorted(store_table(tmp_path / "dynamics", "grad_norm").index) == [2]


def test_packing_says_once_that_probes_are_off(tmp_path):
    trainer = sft(tmp_path, "text", packing=True, max_length=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dynamics.attach(trainer, tasks=TASKS, probe_every=1)
        trainer.train()
    messages = [str(w.message) for w in caught if issubclass(w.category, DynamicsWarning)]
    assert sum("packed rows mix tasks" in m for m in messages) == 1
    _check(trainer)


def dpo(out: Path, **config: Any):
    from trl import DPOConfig, DPOTrainer

    settings: dict[str, Any] = dict(
        **run_settings(out),
        gradient_accumulation_steps=2,
        beta=0.5,
        seed=0,
    )
    settings.update(config)
    return DPOTrainer(
        model=model(),
        ref_model=model(),  # the same initial weights (no model id to load a reference from)
        args=DPOConfig(**settings),
        train_dataset=Dataset.from_list(rows("preference", names=True)),
        processing_class=tokenizer(),
    )


def test_dpo_records_per_task_loss_and_reward_margins(tmp_path):
    trainer = dpo(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dynamics.attach(trainer, tasks=TASKS, probe_every=5)
        trainer.train()
    messages = [str(w.message) for w in caught if issubclass(w.category, DynamicsWarning)]
    assert sum("DPOTrainer: recording per task 'loss'" in m for m in messages) == 1
    run_dir = tmp_path / "dynamics"
    logged = logged_losses(trainer)
    loss, n = store_table(run_dir, "loss"), store_table(run_dir, "n_examples")
    mean = ((loss * n[loss.columns]).sum(axis=1) / n.sum(axis=1)).to_dict()
    for step, value in logged.items():
        assert mean[step] == pytest.approx(value, rel=1e-5)
    margins = store_table(run_dir, "reward_margin")
    history = {h["step"]: h for h in trainer.state.log_history if "rewards/margins" in h}
    for step, h in history.items():  # pair-weighted mean of the per-task margins = TRL's own
        assert (margins.loc[step] * n.loc[step]).sum() / n.loc[step].sum() == pytest.approx(
            h["rewards/margins"], rel=1e-4, abs=1e-6
        )
    for step in logged:
        present = _tasks_in(_step_rows(trainer, step))
        assert set(margins.columns[margins.loc[step].notna()]) == present
        assert set(loss.columns[loss.loc[step].notna()]) == present


def test_dpo_other_losses_say_what_is_not_recorded(tmp_path):
    trainer = dpo(tmp_path, loss_type=["hinge"], max_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dynamics.attach(trainer, tasks=TASKS, probe_every=0)
        trainer.train()
    messages = [str(w.message) for w in caught if issubclass(w.category, DynamicsWarning)]
    assert sum("no 'loss'" in m for m in messages) == 1
    assert store_table(tmp_path / "dynamics", "reward_margin").notna().all().all()


@pytest.mark.parametrize("flags", [[], ["--packing"], ["--lora"]], ids=["chat", "packing", "lora"])
def test_trl_sft_recipe(tmp_path, flags):
    args = ["--out", str(tmp_path), "--steps", "4", "--probe-every", "2", *flags]
    run_dir = runpy.run_path(str(HOOKS / "trl_sft.py"))["main"](args)
    losses = store_table(run_dir, "loss")
    assert sorted(losses.index) == [1, 2, 3, 4]
    assert losses.notna().all().all()
    m = dynamics.load_runs(run_dir).metrics
    probed = sorted(m.loc[m["name"] == "grad_norm", "step"].unique())
    assert probed == ([] if "--packing" in flags else [2, 4])  # packed rows mix tasks: no probes


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_packed_rows_split_by_task_against_a_token_loop(fused):
    """Per-token task ids (two packed rows, right padding): per-task S, N and example counts from
    logits and from a fused output equal an explicit loop over the target tokens (float64)."""
    from types import SimpleNamespace

    from dynamics.integrations.recorder import Recorder
    from dynamics.integrations.trl import _install_observer

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 10, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 10), generator=gen)
    ids = torch.tensor([[0] * 4 + [1] * 6, [2] * 3 + [0] * 5 + [-1] * 2])
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2, 3, 4, 0, 0]])
    labels[position_ids == 0] = -100  # as TRL's padding-free collator: no target across examples
    labels[0, 6] = -100  # an ignored token inside an example
    labels[ids < 0] = -100
    sums, counts = [0.0] * 3, [0] * 3
    logp = torch.log_softmax(logits.double(), dim=-1)
    for b in range(2):
        for t in range(9):
            y = int(labels[b, t + 1])
            if y != -100:
                a = int(ids[b, t + 1])
                sums[a] -= float(logp[b, t, y])
                counts[a] += 1
    if fused:
        targets = labels[:, 1:]
        mask = targets != -100
        log_probs = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        output: Any = SimpleNamespace(log_probs=log_probs * mask, label_mask=mask)
    else:
        output = {"logits": logits}
    recorder = Recorder(TASKS, probe_every=0)
    observer = _install_observer(recorder)
    observer(ids, {"labels": labels, "position_ids": position_ids}, output)
    recorder.end_step(1)
    logs = recorder.logs()
    for a, task in enumerate(TASKS):
        assert logs[f"dynamics/loss/{task}"] == pytest.approx(sums[a] / counts[a], rel=1e-6)
        assert logs[f"dynamics/n_tokens/{task}"] == counts[a]
    # Examples: row 0 holds (count, color), row 1 (greet, count); padding is no example.
    assert [logs[f"dynamics/n_examples/{t}"] for t in TASKS] == [2, 1, 1]


def test_packing_without_the_import_first_says_how_to_fix_it(tmp_path):
    """In a fresh process where dynamics.integrations.trl is imported only by attach (after TRL has
    packed the dataset), attach says once why per-task losses are missing and what to do."""
    import os
    import subprocess
    import sys

    code = f"""
import runpy, warnings
r = runpy.run_path({str(HOOKS / "trl_sft.py")!r})
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
tok = r["build_tokenizer"]()
config = SFTConfig(output_dir={str(tmp_path)!r}, packing=True, max_length=32, max_steps=1, use_cpu=True,
                   report_to="none", bf16=False, save_strategy="no", disable_tqdm=True)
trainer = SFTTrainer(model=r["build_model"](len(tok), 0), args=config, processing_class=tok,
                     train_dataset=Dataset.from_list(r["conversations"](24, 0)))
import dynamics
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    dynamics.attach(trainer, tasks=r["TASKS"], probe_every=0)
print(sum("packed its dataset without 'task_ids'" in str(w.message) for w in caught))
"""
    root = HOOKS.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=str(root), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "1"


def test_import_dynamics_before_trl_is_enough_for_packing():
    """`import dynamics` (light: no torch) arms an import hook that patches SFTTrainer's packing as soon
    as TRL's SFT trainer module is executed, so a packing script needs only the two documented lines."""
    import os
    import subprocess
    import sys

    code = """
import sys
import dynamics
assert "torch" not in sys.modules and "trl" not in sys.modules
from trl import SFTTrainer
patched = getattr(SFTTrainer._prepare_dataset, "__wrapped__", None)  # before this test imports the adapter
assert patched is not None, "TRL's packing was not patched by importing dynamics"
import dynamics.integrations.trl as adapter
assert patched is adapter._ORIGINAL_PREPARE
print("patched")
"""
    root = HOOKS.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=str(root), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "patched"
