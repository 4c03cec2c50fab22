"""A zoo of tiny open vision-language architectures, built from configs (no download).

The paper fine-tunes seven open medical MLLMs; their CPU analogue here is the same Hugging Face
architectures at toy width, randomly initialised from a config:

=============  ==========================  =====================  ============================
name           vision encoder              connector              language model
=============  ==========================  =====================  ============================
llava          CLIP ViT                    2-layer MLP            Llama
paligemma      SigLIP ViT                  linear, prefix-LM      Gemma
qwen2_vl       Qwen2-VL ViT (2D RoPE)      2x2 patch merger       Qwen2 (M-RoPE)
idefics3       SigLIP-style ViT            pixel shuffle          Llama          (SmolVLM's base)
internvl       InternViT                   pixel shuffle + MLP    Qwen2
gemma3         SigLIP ViT                  avg-pool to N tokens   Gemma 3 (bidirectional image)
mistral3       Pixtral ViT (2D RoPE)       2x2 patch merger       Mistral
smolvlm        SmolVLM vision              pixel shuffle          Llama
lfm2_vl        SigLIP2 NaFlex              pixel unshuffle + MLP  LFM2 (conv + attention)
=============  ==========================  =====================  ============================

Each :class:`Arch` knows the three things that differ between architectures and that a collator
needs: the token sequence standing for one image (placeholders plus the wrappers the real processor
inserts), the pixel inputs (``pixel_values`` layout plus ``image_grid_thw`` / ``image_sizes`` /
``pixel_attention_mask`` / ``spatial_shapes``) and per-token extras (PaliGemma's prefix/suffix
``token_type_ids``, Gemma 3's image ``token_type_ids``, Qwen2-VL's ``mm_token_type_ids`` for M-RoPE).
Images come in as a float tensor ``(B, H, W)`` in [0, 1]; every architecture sees them normalised to
[-1, 1] and replicated to 3 channels, as their processors do for a grey image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import transformers as T
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dynamics.experiments.imax_dmax import tokenizer as tk


@dataclass(frozen=True)
class Dims:
    """Widths of the tiny models (shared by vision and text towers unless stated)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_layers: int = 2
    patch: int = 8

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _ids(tok: PreTrainedTokenizerBase, *tokens: str) -> list[int]:
    ids = tok.convert_tokens_to_ids(list(tokens))
    return [int(i) for i in (ids if isinstance(ids, list) else [ids])]


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) in [0, 1] -> (B, 3, H, W) in [-1, 1] (mean 0.5, std 0.5 per channel)."""
    if images.dim() != 3:
        raise ValueError(f"images must be (batch, height, width), got shape {tuple(images.shape)}")
    return ((images - 0.5) / 0.5).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


class Arch:
    """Base class: a square image of ``size`` pixels, ``patch`` pixels per ViT patch."""

    name: str = ""
    description: str = ""
    merge: int = 1  # tokens per side are (size / patch) / merge
    framed: bool = False  # the processor wraps the image tokens in <image_start> ... <image_end>

    def __init__(self, size: int = 48, dims: Dims | None = None):
        self.dims = dims or Dims()
        self.size = size
        grid = size // self.dims.patch
        if size % self.dims.patch or grid % self.merge:
            raise ValueError(
                f"{self.name}: image size {size} must be a multiple of patch*merge = "
                f"{self.dims.patch * self.merge}; choose e.g. size={self.dims.patch * self.merge * 3}"
            )
        self.grid = grid

    # --- what the collator asks for ---------------------------------------------------------
    @property
    def n_image_tokens(self) -> int:
        return (self.grid // self.merge) ** 2

    def image_token_ids(self, tok: PreTrainedTokenizerBase) -> list[int]:
        """Token ids standing for one image in the text sequence (placeholders and wrappers)."""
        ids = _ids(tok, tk.IMAGE) * self.n_image_tokens
        return _ids(tok, tk.IMAGE_START) + ids + _ids(tok, tk.IMAGE_END) if self.framed else ids

    def pixel_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": _normalise(images)}

    def token_inputs(
        self, input_ids: torch.Tensor, prefix_mask: torch.Tensor, tok: PreTrainedTokenizerBase
    ) -> dict[str, torch.Tensor]:
        """Per-token extras; ``prefix_mask`` is True on image + instruction tokens (not the answer)."""
        return {}

    # --- model ----------------------------------------------------------------------------------
    def text_kwargs(self, tok: PreTrainedTokenizerBase) -> dict:
        d = self.dims
        return dict(
            vocab_size=len(tok),
            hidden_size=d.hidden,
            intermediate_size=d.intermediate,
            num_hidden_layers=d.layers,
            num_attention_heads=d.heads,
            num_key_value_heads=d.kv_heads,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )

    def vision_kwargs(self) -> dict:
        d = self.dims
        return dict(
            hidden_size=d.hidden,
            intermediate_size=d.intermediate,
            num_hidden_layers=d.vision_layers,
            num_attention_heads=d.heads,
            image_size=self.size,
            patch_size=d.patch,
            num_channels=3,
        )

    def config(self, tok: PreTrainedTokenizerBase) -> T.PreTrainedConfig:
        raise NotImplementedError

    model_class: type[PreTrainedModel]

    def build(self, tok: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
        """Randomly initialised model (deterministic in ``seed``) with generation ids set."""
        torch.manual_seed(seed)
        cfg = self.config(tok)
        model = self.model_class(cfg)
        gc = model.generation_config
        gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = (
            tok.pad_token_id,
            tok.eos_token_id,
            tok.bos_token_id,
        )
        gc.do_sample = False
        return model


class Llava(Arch):
    name, description = "llava", "CLIP ViT + MLP projector + Llama"
    model_class = T.LlavaForConditionalGeneration

    def config(self, tok):
        return T.LlavaConfig(
            vision_config=T.CLIPVisionConfig(**self.vision_kwargs()),
            text_config=T.LlamaConfig(**self.text_kwargs(tok)),
            image_token_index=_ids(tok, tk.IMAGE)[0],
            vision_feature_layer=-1,
            projector_hidden_act="gelu",
        )


class PaliGemma(Arch):
    name, description = "paligemma", "SigLIP ViT + linear projector + Gemma (prefix-LM)"
    model_class = T.PaliGemmaForConditionalGeneration

    def config(self, tok):
        return T.PaliGemmaConfig(
            vision_config=T.SiglipVisionConfig(**self.vision_kwargs()),
            text_config=T.GemmaConfig(**self.text_kwargs(tok), head_dim=self.dims.head_dim),
            image_token_index=_ids(tok, tk.IMAGE)[0],
            projection_dim=self.dims.hidden,
            hidden_size=self.dims.hidden,
        )

    def token_inputs(self, input_ids, prefix_mask, tok):
        # PaliGemma attends bidirectionally over the prefix (type 0) and causally over the suffix (1).
        return {"token_type_ids": (~prefix_mask).long()}


class Qwen2VLBatchFirst(T.Qwen2VLForConditionalGeneration):
    """Qwen2-VL that also accepts ``pixel_values`` as ``(batch, patches, patch_dim)``.

    Qwen2-VL's processor packs the patches of all images along dimension 0, which no per-example
    split of a batch can slice; this class takes one row of patches per example and packs them
    before the unchanged forward (same weights, same computation), so that the dynamics probe can
    treat dimension 0 of every input as the example axis.
    """

    def __init__(self, config):
        super().__init__(config)
        self.loss_type = "ForCausalLM"  # the parent's name-based guess does not match this class

    # wraps: generate() validates its keyword arguments against forward's signature.
    @functools.wraps(T.Qwen2VLForConditionalGeneration.forward)
    def forward(self, *args, **kwargs):
        pv = kwargs.get("pixel_values")
        if pv is not None and pv.dim() == 3:
            kwargs["pixel_values"] = pv.flatten(0, 1)
        return super().forward(*args, **kwargs)


class Qwen2VL(Arch):
    name, description = "qwen2_vl", "Qwen2-VL ViT (2D RoPE) + 2x2 patch merger + Qwen2 (M-RoPE)"
    model_class = Qwen2VLBatchFirst
    merge = 2
    framed = True
    temporal = 2

    def config(self, tok):
        d = self.dims
        vc = dict(
            depth=d.vision_layers,
            embed_dim=d.hidden,
            hidden_size=d.hidden,
            num_heads=d.heads,
            mlp_ratio=max(1, d.intermediate // d.hidden),
            patch_size=d.patch,
            spatial_merge_size=self.merge,
            temporal_patch_size=self.temporal,
            in_channels=3,
        )
        # M-RoPE splits head_dim/2 rotary frequencies over (time, height, width).
        half = d.head_dim // 2
        section = [half - 2 * (half // 3), half // 3, half // 3]
        text = dict(
            **self.text_kwargs(tok),
            rope_parameters=dict(rope_type="default", mrope_section=section, rope_theta=1e4),
        )
        return T.Qwen2VLConfig(
            vision_config=vc,
            text_config=text,
            image_token_id=_ids(tok, tk.IMAGE)[0],
            video_token_id=_ids(tok, tk.VIDEO)[0],
            vision_start_token_id=_ids(tok, tk.IMAGE_START)[0],
            vision_end_token_id=_ids(tok, tk.IMAGE_END)[0],
        )

    def pixel_inputs(self, images):
        """Flattened patches in merge-window order, as ``Qwen2VLImageProcessor.patchify`` lays them out.

        (B, 3, H, W) -> (B, gh * gw, 3 * temporal * p * p) with rows ordered (block row, block col,
        row in block, col in block) and each patch repeated ``temporal`` times (a still image is a
        two-frame video to the Conv3d patch embedding); ``image_grid_thw`` = (1, gh, gw). Flattened
        over the batch this is exactly the processor's packed layout.
        """
        x = _normalise(images)
        b, c, h, w = x.shape
        p, m, g = self.dims.patch, self.merge, self.grid
        x = x.reshape(b, c, g // m, m, p, g // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, self.temporal, -1, -1)
        per_example = x.reshape(b, g * g, c * self.temporal * p * p)  # packed by Qwen2VLBatchFirst
        grid = torch.tensor([[1, g, g]] * b, dtype=torch.long)
        return {"pixel_values": per_example, "image_grid_thw": grid}

    def token_inputs(self, input_ids, prefix_mask, tok):
        return {"mm_token_type_ids": (input_ids == _ids(tok, tk.IMAGE)[0]).int()}


class Idefics3(Arch):
    name, description = "idefics3", "SigLIP-style ViT + pixel shuffle + Llama"
    model_class: type[PreTrainedModel] = T.Idefics3ForConditionalGeneration
    merge = 2  # pixel-shuffle scale factor

    def _configs(self):
        return T.Idefics3Config, T.Idefics3VisionConfig

    def config(self, tok):
        cfg_cls, vis_cls = self._configs()
        return cfg_cls(
            vision_config=vis_cls(**self.vision_kwargs()),
            text_config=T.LlamaConfig(**self.text_kwargs(tok)),
            image_token_id=_ids(tok, tk.IMAGE)[0],
            scale_factor=self.merge,
        )

    def image_token_ids(self, tok):
        # <fake_token_around_image><global-img><image>*n<fake_token_around_image>, as the processor writes it.
        return (
            _ids(tok, tk.IMAGE_START, tk.IMAGE_GLOBAL)
            + _ids(tok, tk.IMAGE) * self.n_image_tokens
            + _ids(tok, tk.IMAGE_START)
        )

    def pixel_inputs(self, images):
        x = _normalise(images).unsqueeze(1)  # (B, num_images=1, 3, H, W)
        mask = torch.ones(x.shape[0], 1, x.shape[-2], x.shape[-1], dtype=torch.bool)
        return {"pixel_values": x, "pixel_attention_mask": mask}


class SmolVLM(Idefics3):
    name, description = "smolvlm", "SmolVLM vision + pixel shuffle + Llama"
    model_class = T.SmolVLMForConditionalGeneration

    def _configs(self):
        return T.SmolVLMConfig, T.SmolVLMVisionConfig


class InternVL(Arch):
    name, description = "internvl", "InternViT + pixel shuffle + MLP + Qwen2"
    model_class = T.InternVLForConditionalGeneration
    merge = 2
    framed = True

    def config(self, tok):
        d = self.dims
        return T.InternVLConfig(
            vision_config=T.InternVLVisionConfig(
                hidden_size=d.hidden,
                intermediate_size=d.intermediate,
                num_hidden_layers=d.vision_layers,
                num_attention_heads=d.heads,
                image_size=[self.size, self.size],
                patch_size=[d.patch, d.patch],
            ),
            text_config=T.Qwen2Config(**self.text_kwargs(tok)),
            image_token_id=_ids(tok, tk.IMAGE)[0],
            downsample_ratio=1.0 / self.merge,
        )


class Gemma3(Arch):
    name, description = "gemma3", "SigLIP ViT + average pooling + Gemma 3"
    model_class = T.Gemma3ForConditionalGeneration
    merge = 2  # average-pool kernel: mm_tokens_per_image = (grid / 2)^2
    framed = True

    def config(self, tok):
        d = self.dims
        return T.Gemma3Config(
            vision_config=T.SiglipVisionConfig(**self.vision_kwargs()),
            text_config=T.Gemma3TextConfig(**self.text_kwargs(tok), head_dim=d.head_dim, sliding_window=512),
            image_token_index=_ids(tok, tk.IMAGE)[0],
            boi_token_index=_ids(tok, tk.IMAGE_START)[0],
            eoi_token_index=_ids(tok, tk.IMAGE_END)[0],
            mm_tokens_per_image=self.n_image_tokens,
        )

    def build(self, tok, seed=0):
        model = super().build(tok, seed)
        # Gemma 3 zero-initialises its image projection (it is always loaded pretrained), which
        # leaves a from-scratch image pathway dead at step 0; use the config's normal init instead.
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            proj.normal_(0.0, model.config.text_config.initializer_range)
        return model

    def token_inputs(self, input_ids, prefix_mask, tok):
        # Gemma 3 attends bidirectionally within an image: token type 1 marks image tokens.
        return {"token_type_ids": (input_ids == _ids(tok, tk.IMAGE)[0]).long()}


class Mistral3(Arch):
    name, description = "mistral3", "Pixtral ViT (2D RoPE) + 2x2 patch merger + Mistral"
    model_class = T.Mistral3ForConditionalGeneration
    merge = 2

    def config(self, tok):
        d = self.dims
        return T.Mistral3Config(
            vision_config=T.PixtralVisionConfig(
                hidden_size=d.hidden,
                intermediate_size=d.intermediate,
                num_hidden_layers=d.vision_layers,
                num_attention_heads=d.heads,
                image_size=self.size,
                patch_size=d.patch,
                head_dim=d.head_dim,
            ),
            text_config=T.MistralConfig(**self.text_kwargs(tok), head_dim=d.head_dim),
            image_token_index=_ids(tok, tk.IMAGE)[0],
            spatial_merge_size=self.merge,
        )

    def image_token_ids(self, tok):
        # Pixtral's layout: a row of image tokens, [IMG_BREAK] after each row, [IMG_END] after the last.
        side = self.grid // self.merge
        row = _ids(tok, tk.IMAGE) * side
        out: list[int] = []
        for r in range(side):
            out += row + _ids(tok, tk.IMAGE_END if r == side - 1 else tk.IMAGE_BREAK)
        return out

    def pixel_inputs(self, images):
        x = _normalise(images)
        return {"pixel_values": x, "image_sizes": torch.tensor([[self.size, self.size]] * x.shape[0])}


class Lfm2VL(Arch):
    name, description = "lfm2_vl", "SigLIP2 NaFlex ViT + pixel unshuffle + LFM2"
    model_class = T.Lfm2VlForConditionalGeneration
    merge = 2
    framed = True

    def config(self, tok):
        d = self.dims
        text = self.text_kwargs(tok)
        text.pop("max_position_embeddings")
        return T.Lfm2VlConfig(
            vision_config=T.Siglip2VisionConfig(
                hidden_size=d.hidden,
                intermediate_size=d.intermediate,
                num_hidden_layers=d.vision_layers,
                num_attention_heads=d.heads,
                patch_size=d.patch,
                num_patches=self.grid**2,
            ),
            text_config=T.Lfm2Config(**text),
            image_token_id=_ids(tok, tk.IMAGE)[0],
            downsample_factor=self.merge,
            projector_hidden_size=d.hidden,
        )

    def pixel_inputs(self, images):
        """NaFlex layout: (B, gh * gw, 3 * p * p) patches in row-major order, channels last in a patch."""
        x = _normalise(images)
        b, c, _, _ = x.shape
        p, g = self.dims.patch, self.grid
        patches = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c)
        return {
            "pixel_values": patches,
            "spatial_shapes": torch.tensor([[g, g]] * b, dtype=torch.long),
            "pixel_attention_mask": torch.ones(b, g * g, dtype=torch.bool),
        }


ARCHITECTURES: dict[str, type[Arch]] = {
    cls.name: cls
    for cls in (Llava, PaliGemma, Qwen2VL, Idefics3, InternVL, Gemma3, Mistral3, SmolVLM, Lfm2VL)
}


def get_arch(name: str, size: int = 48, dims: Dims | None = None) -> Arch:
    """The architecture called ``name`` for ``size``-pixel images (see ``ARCHITECTURES``)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](size=size, dims=dims)
