"""On a CUDA device, ``dynamics.probe`` equals the float64 CPU reference: Gram matrix and per-task norms.

The reference is the brute-force one of the CPU tests (:func:`tests.reference.ref_grads`: a loop of
per-example ``autograd.grad`` on a float64 copy of the model on the CPU, then ``G G^T`` and the task
vectors of :func:`tests.reference.ref_signals`). The probe runs on ``cuda``, once over every
trainable parameter (``K`` and the task norms) and once per parameter (``params=[p]`` against the
block ``G_p G_p^T``: the whole ``K`` is dominated by the embeddings and the LM head, so a wrong small
layer hides in it below float32 rounding; per block it cannot). The model is in

* ``float64``: the same arithmetic as the reference up to summation order: ``1e-9`` of ``max |K|``
  (the CPU tests' bound);
* ``float32`` with TF32 off (TF32 rounds matmul / convolution inputs to a 10-bit mantissa, a
  bfloat16-class error that is the hardware's, not the probe's): ``1e-4`` of ``max |K|`` (and of
  each block's, each task norm's), the CPU test's bound for a float32 model
  (``test_float32_model_close_to_float64``); measured on the CPU: 1e-6 or less;
* ``bfloat16``, cast (``model.to(torch.bfloat16)``) or under ``torch.autocast``: the model's own
  rounding (unit roundoff ``u = 2**-8``, compounded over the layers) dominates whatever the probe
  adds (its products run in float32, ``K`` is summed in float64). So the bound is set by what bf16
  training's own gradients achieve on the same device: the brute-force per-example gradients of the
  bf16 model (the same ``ref_grads`` loop, on ``cuda``) are ``e_bf16`` away from the float64
  reference, and the probe must be within ``2 * e_bf16 + 8 * u`` (``8 u ~ 0.03``: room for a
  different but equally valid rounding order where bf16 autograd happens to be lucky). Measured
  on the CPU (same models, bf16): the probe's error equals ``e_bf16`` to two digits when the model
  is cast (0.1-4 % of ``max |K|``); under autocast it is up to 4.2 times ``e_bf16`` (0.3 % against
  0.08 % on the Llama), inside the ``8 u`` floor.

Models: a tiny Llama built from config with sdpa attention, two zoo VLMs of the reproduction
(Idefics3; Qwen2-VL with its Conv3d patch embedding and packed patches), and the LLaVA and LoRA-Llama
of :mod:`tests.tiny_models`. Where the CPU tests require that no parameter takes the exact per-example
path (the HF families, the tiny-model families), so does this test.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pytest
import torch

from dynamics import probe
from tests import tiny_models as tm
from tests.reference import ref_grads, ref_signals

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda)")

DEVICE = "cuda"
N_TASKS = 3
EPS64 = float(torch.finfo(torch.float64).eps)
U_BF16 = 2.0**-8  # bfloat16 machine epsilon (8 significand bits)
MODES = [
    "float64",
    "float32",
    "bfloat16",
    "autocast_bf16",  # products run outside autocast (products.without_autocast), tested on CPU too
]


@dataclass
class Case:
    model: torch.nn.Module  # float64, CPU
    batch: dict[str, torch.Tensor]  # float64 floating inputs, CPU
    task_ids: torch.Tensor
    kind: str
    exact_free: bool  # the CPU tests require coverage["exact"] == []


def _to64(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def _llama_sdpa() -> Case:
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng():  # seeded, leaving the caller's RNG state as it was
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(cfg).double()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (6, 14), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[4, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return Case(model, batch, torch.tensor([0, 1, 2, 0, 1, 2]), "causal_lm", True)


def _tiny(family: str) -> Case:
    pair = cast(tuple[Callable[..., torch.nn.Module], Callable[..., Any]], tm.BUILDERS[family])
    builder, maker = pair
    batch, task_ids = maker(n=6, n_tasks=N_TASKS, seed=0)
    return Case(builder(seed=0, dtype=torch.float64), _to64(batch), task_ids, "causal_lm", True)


def _zoo(name: str) -> Case:
    from dynamics.experiments.imax_dmax.constructions import build_bundle
    from dynamics.experiments.imax_dmax.data import EntryDataset, VLMCollator
    from dynamics.experiments.imax_dmax.tokenizer import build_tokenizer
    from dynamics.experiments.imax_dmax.zoo import Dims, get_arch
    from dynamics.integrations.probe_batch import split_task_ids

    tok = build_tokenizer()
    ds = EntryDataset(build_bundle(12, 4, seed=2).imax, tok)
    arch = get_arch(name, size=48, dims=Dims(hidden=32, intermediate=64, layers=1, vision_layers=1))
    batch, task_ids = split_task_ids(VLMCollator(arch, tok)([ds[i] for i in range(6)]))
    # the tasks of six consecutive entries, renumbered 0..T-1 so every id names a present task
    _, task_ids = torch.unique(task_ids, return_inverse=True)
    with torch.random.fork_rng():  # build() seeds the global RNG
        model = arch.build(tok, seed=0).double()
    return Case(model, _to64(batch), task_ids, "causal_lm", False)


BUILDERS: dict[str, Callable[[], Case]] = {
    "llama_sdpa": _llama_sdpa,
    "tiny_llava": lambda: _tiny("llava"),
    "lora_llama": lambda: _tiny("lora_llama"),
    "zoo_idefics3": lambda: _zoo("idefics3"),
    "zoo_qwen2_vl": lambda: _zoo("qwen2_vl"),
}


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@dataclass
class Grads:
    """Per-example gradients ``G`` (n x P, float64) with each parameter's columns, ``K`` and task norms."""

    G: np.ndarray
    cols: dict[str, slice]
    gram: np.ndarray
    task_norm: np.ndarray

    def block(self, name: str) -> np.ndarray:
        """One parameter's Gram ``G_p G_p^T``."""
        B = self.G[:, self.cols[name]]
        return B @ B.T


def brute_force(case: Case, device: str = "cpu", mode: str = "float64") -> Grads:
    """Per-example gradients by a loop of ``autograd.grad`` (:func:`tests.reference.ref_grads`), in
    ``mode`` on ``device``; the defaults give the float64 CPU reference."""
    model, batch, ctx = on_device(case, device, mode)
    named = trainable(model)
    with ctx:
        G, losses, weights = ref_grads(model, batch, [p for _, p in named], case.kind)
    cols, start = {}, 0
    for n, p in named:
        cols[n] = slice(start, start + p.numel())
        start += p.numel()
    n_tasks = int(case.task_ids.max()) + 1
    sig = ref_signals(G, losses, weights, case.task_ids.numpy(), n_tasks, EPS64, dense_fisher=False)
    return Grads(G, cols, sig.gram, sig.task_norm)


def on_device(case: Case, device: str, mode: str) -> tuple[torch.nn.Module, dict, AbstractContextManager]:
    """The case's model and batch moved to ``device`` in ``mode``, and the context to run them in."""
    dtype = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        mode, torch.float32
    )
    model = copy.deepcopy(case.model).to(device=device, dtype=dtype)
    batch = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in case.batch.items()
    }
    ctx: AbstractContextManager = (
        torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        if mode == "autocast_bf16"
        else nullcontext()
    )
    return model, batch, ctx


def gram_error(gram: np.ndarray, ref: np.ndarray, floor: float = 0.0) -> float:
    """``max |K - K_ref| / max(max |K_ref|, floor)``."""
    return float(np.abs(gram - ref).max() / max(np.abs(ref).max(), floor))


def norm_error(task_norm: np.ndarray, ref: np.ndarray) -> float:
    """The largest relative error of a present task's gradient norm."""
    present = np.isfinite(ref)
    return float(np.max(np.abs(task_norm[present] - ref[present]) / ref[present]))


def bound(mode: str, brute_error: Callable[[], float]) -> float:
    """The allowed relative error in ``mode`` (module docstring); ``brute_error`` is bf16 autograd's."""
    if mode == "float64":
        return 1e-9
    if mode == "float32":
        return 1e-4
    return 2 * brute_error() + 8 * U_BF16


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def case_ref(request) -> tuple[str, Case, Grads]:
    """One model at a time (module scope: its CPU reference is computed once for all modes)."""
    case = BUILDERS[request.param]()
    return request.param, case, brute_force(case)


@pytest.fixture
def no_tf32():
    """Full float32 matmuls and convolutions on the GPU for the duration of one test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("mode", MODES)
def test_cuda_probe_matches_float64_cpu_reference(
    case_ref: tuple[str, Case, Grads], mode: str, no_tf32
) -> None:
    """Every trainable parameter at once (the default probe): ``K`` and the per-task gradient norms."""
    name, case, ref = case_ref
    assert np.abs(ref.gram).max() > 0
    model, batch, ctx = on_device(case, DEVICE, mode)
    with ctx:
        res = probe(model, batch, task_ids=case.task_ids)
    assert res.gram.dtype == torch.float64
    bf16 = functools.cache(lambda: brute_force(case, DEVICE, mode))
    e_gram, e_norm = (
        gram_error(res.gram.numpy(), ref.gram),
        norm_error(res.task_grad_norm.numpy(), ref.task_norm),
    )
    tol_gram = bound(mode, lambda: gram_error(bf16().gram, ref.gram))
    tol_norm = 1e-7 if mode == "float64" else bound(mode, lambda: norm_error(bf16().task_norm, ref.task_norm))
    assert e_gram <= tol_gram, f"{name} {mode}: Gram off by {e_gram:.3g} of max |K| (bound {tol_gram:.3g})"
    assert e_norm <= tol_norm, (
        f"{name} {mode}: a task norm off by {e_norm:.3g} relative (bound {tol_norm:.3g})"
    )
    if case.exact_free:
        assert res.coverage["exact"] == []
    else:  # zoo: the image reaches the loss, and its tower's gradients are part of K
        vision = {n for n, _ in model.named_parameters() if "vision" in n or "visual" in n}
        assert vision - set(res.coverage["unused"])


@pytest.mark.parametrize("mode", [m for m in MODES if m != "float64"])
def test_cuda_probe_per_parameter(case_ref: tuple[str, Case, Grads], mode: str, no_tf32) -> None:
    """Each parameter alone (``params=[p]``) against its own reference block ``G_p G_p^T``.

    The whole ``K`` is dominated by a few large blocks (embeddings, the LM head): a wrong or missing
    small layer moves it by far less than float32's, let alone bfloat16's, rounding. Per block, the
    bound is relative to the block's own scale, so every layer rule is checked at every precision.
    The scale is never below a millionth of the whole ``K``'s: a block that small (attention key
    biases: softmax ignores a shift shared by all keys, so their gradient is zero) holds rounding
    noise even in float64.
    """
    name, case, ref = case_ref
    model, batch, ctx = on_device(case, DEVICE, mode)
    bf16 = functools.cache(lambda: brute_force(case, DEVICE, mode))
    floor = 1e-6 * float(np.abs(ref.gram).max())
    failures = []
    for pname, p in trainable(model):
        K_ref = ref.block(pname)
        with ctx:
            res = probe(model, batch, task_ids=case.task_ids, params=[p])
        K = res.gram.numpy()
        if np.abs(K_ref).max() == 0:  # no gradient reaches it: the probe must say zero too
            if np.abs(K).max() != 0:
                failures.append(f"{pname}: unused, probe gives max |K| = {np.abs(K).max():.3g}")
            continue
        err = gram_error(K, K_ref, floor)
        tol = bound(mode, lambda: gram_error(bf16().block(pname), K_ref, floor))  # noqa: B023 (called at once)
        if not err <= tol:
            failures.append(f"{pname}: off by {err:.3g} of its max |K| (bound {tol:.3g})")
    assert not failures, f"{name} {mode}: " + "; ".join(failures)
