"""Every zoo architecture builds, trains a step with task_ids stripped, and generates consistently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynamics.experiments.imax_dmax.constructions import build_bundle
from dynamics.experiments.imax_dmax.data import IGNORE_INDEX, EntryDataset, VLMCollator
from dynamics.experiments.imax_dmax.evaluate import generate_answers
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES
from dynamics.experiments.imax_dmax.tokenizer import build_tokenizer
from dynamics.experiments.imax_dmax.zoo import ARCHITECTURES, Dims, get_arch
from dynamics.integrations.task_ids import TaskIdHook

DIMS = Dims(hidden=32, intermediate=64, layers=1, vision_layers=1)


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    bundle = build_bundle(12, 4, seed=2)
    ds = EntryDataset(bundle.imax, tok)
    # One example per task, so that the batch mixes answer lengths (1 to 17 words).
    picks = [next(i for i, e in enumerate(ds.entries) if e.task == t) for t in TASK_NAMES]
    return tok, ds, picks


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_forward_backward_with_task_ids_stripped(name, setup):
    tok, ds, picks = setup
    arch = get_arch(name, size=48, dims=DIMS)
    model = arch.build(tok, seed=0)
    batch = VLMCollator(arch, tok)([ds[i] for i in picks])
    assert batch["task_ids"].tolist() == list(range(len(TASK_NAMES)))
    seen = []
    hook = TaskIdHook(model, lambda ids, kwargs, out: seen.append(ids))
    out = model(**batch)
    hook.remove()
    assert seen and seen[0].tolist() == list(range(len(TASK_NAMES)))
    # Brute-force reference: next-token cross-entropy over answer positions only.
    labels = batch["labels"]
    n_answer = sum(len(ds[i]["answer"]) + 1 for i in picks)  # answer words + <eos>
    assert int((labels != IGNORE_INDEX).sum()) == n_answer
    ref = F.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(out.loss, ref, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    # The image reaches the loss: the vision tower gets a gradient.
    vision = [p for n, p in model.named_parameters() if "vision" in n or "visual" in n]
    assert vision and any(p.grad is not None and p.grad.abs().sum() > 0 for p in vision)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_answers_depend_on_the_image_and_not_on_padding(name, setup):
    tok, ds, picks = setup
    arch = get_arch(name, size=48, dims=DIMS)
    model = arch.build(tok, seed=1).eval()
    col = VLMCollator(arch, tok, prompt_only=True, emit_task_ids=False)
    ex = [ds[i] for i in picks]
    with torch.no_grad():
        batch = col(ex)
        logits = model(**batch).logits[:, -1]
        flipped = col([{**e, "image": e["image"].flip(-1)} for e in ex])
        assert not torch.allclose(logits, model(**flipped).logits[:, -1])
        # Left padding is invisible: each prompt alone gives the batch's next-token logits.
        for r, e in enumerate(ex):
            alone = model(**col([e])).logits[0, -1]
            torch.testing.assert_close(alone, logits[r], rtol=1e-4, atol=1e-4)


def test_batched_generation_matches_one_by_one(setup):
    tok, ds, picks = setup
    arch = get_arch("qwen2_vl", size=48, dims=DIMS)
    model = arch.build(tok, seed=0)
    sub = torch.utils.data.Subset(ds, picks)
    sub.entries = [ds.entries[i] for i in picks]
    batched = generate_answers(model, arch, tok, sub, batch_size=len(picks))
    single = generate_answers(model, arch, tok, sub, batch_size=1)
    assert batched == single and len(batched) == len(picks)


def test_qwen2_vl_patches_match_the_image_processor():
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    arch = get_arch("qwen2_vl", size=48, dims=DIMS)
    imgs = torch.rand(2, 48, 48)
    ours = arch.pixel_inputs(imgs)
    proc = pil.Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2, do_resize=False, do_rescale=False,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )  # fmt: skip
    three = imgs.unsqueeze(1).expand(-1, 3, -1, -1).numpy()
    ref = proc(images=list(three), return_tensors="pt", input_data_format="channels_first")
    torch.testing.assert_close(ours["pixel_values"].flatten(0, 1), ref["pixel_values"].float())
    assert ours["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()


def test_lfm2_vl_patches_match_siglip2_layout():
    pil = pytest.importorskip("transformers.models.siglip2.image_processing_pil_siglip2")
    arch = get_arch("lfm2_vl", size=48, dims=DIMS)
    imgs = torch.rand(2, 48, 48)
    ours = arch.pixel_inputs(imgs)["pixel_values"]
    for b in range(2):
        x = ((imgs[b] - 0.5) / 0.5).expand(3, -1, -1).numpy()
        np.testing.assert_allclose(ours[b].numpy(), pil.convert_image_to_patches(x, 8), rtol=1e-6)


def test_bad_sizes_and_names_are_rejected():
    with pytest.raises(ValueError, match="multiple of"):
        get_arch("qwen2_vl", size=40)
    with pytest.raises(ValueError, match="unknown architecture"):
        get_arch("gpt4v")
