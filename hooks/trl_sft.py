"""Recipe: training dynamics from a TRL SFTTrainer script, with two added lines.

    python hooks/trl_sft.py --out runs/trl_sft --steps 20
    python hooks/trl_sft.py --out runs/trl_sft_packed --packing          # packed rows, per-token task ids
    python hooks/trl_sft.py --out runs/trl_sft_lora --lora               # LoRA adapters (peft)

What your script needs: each training example carries ``task_ids`` (the task's name, or its index
in ``TASKS``), in any dataset format SFTTrainer takes (here: conversations with
``assistant_only_loss``), then

    import dynamics
    dynamics.attach(trainer, tasks=TASKS)

before ``trainer.train()``. ``attach`` keeps ``task_ids`` through TRL's collator, reads TRL's fused
outputs (per-token log-probs, no logits) and, with ``packing=True``, counts every packed example
for its own task. TRL packs inside ``SFTTrainer(...)`` and keeps only the tokens and labels, so
``import dynamics`` must come before the trainer is built (as at the top of any script): it makes
TRL pack the task ids along with the tokens. Per-task losses land in ``<output_dir>/dynamics`` and in
the trainer's logs.

The model is a tiny Llama built from a config and the tokenizer a word-level one built from the
recipe's own words, so it runs offline in seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

TASKS = ["count", "colour", "greet"]
WORDS = {
    "count": "one two three four five six seven eight".split(),
    "colour": "red blue green pink gray black white gold".split(),
    "greet": "hello hi hey bye welcome morning evening night".split(),
}
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]
# {% generation %} marks the assistant's tokens, which assistant_only_loss trains on.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {% generation %}"
    "{{ m['content'] }} <eos> {% endgeneration %}{% else %}<|user|> {{ m['content'] }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + [w for words in WORDS.values() for w in words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config)


def conversations(n: int, seed: int) -> list[dict[str, Any]]:
    """Each task's assistant continues the user's words of that task in order (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        words = WORDS[task]
        start, length = int(torch.randint(0, len(words), (1,), generator=gen)), 2 + i % 3
        seq = [words[(start + k) % len(words)] for k in range(2 * length)]
        messages = [
            {"role": "user", "content": " ".join(seq[:length])},
            {"role": "assistant", "content": " ".join(seq[length:])},
        ]
        rows.append({"messages": messages, "task_ids": task})
    return rows


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/trl_sft", help="output_dir (the store goes in <out>/dynamics)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--packing", action="store_true", help="pack examples into rows of --max-length")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (peft)")
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_argument("--probe-size", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import dynamics

    if args.packing:
        import dynamics.integrations.trl  # noqa: F401  (before SFTTrainer(...): pack task ids with the tokens)

    tokenizer = build_tokenizer()
    config = SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=3e-3,
        logging_steps=5,
        assistant_only_loss=True,
        packing=args.packing,
        max_length=args.max_length,
        bf16=False,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        disable_tqdm=True,
    )
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = SFTTrainer(
        model=build_model(len(tokenizer), args.seed),
        args=config,
        train_dataset=Dataset.from_list(conversations(120, args.seed)),
        processing_class=tokenizer,
        peft_config=peft_config,
    )

    # -- the two lines --------------------------------------------------------------------------
    callback = dynamics.attach(trainer, tasks=TASKS, probe_every=args.probe_every, probe_size=args.probe_size)
    trainer.train()
    # -------------------------------------------------------------------------------------------

    callback.close()
    assert callback.run_dir is not None
    print(f"run store: {callback.run_dir}")
    return Path(callback.run_dir)


if __name__ == "__main__":
    main()
