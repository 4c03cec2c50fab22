"""Presets of the reproduction: data sizes, model list, seeds and training budget.

``quick`` is the smoke test the end-to-end test runs (two architectures, one seed, a few hundred
steps: the pipeline and its artefacts, not the science; under 5 minutes on 2 cores). ``full`` is
the experiment README reports (every architecture the budget allows, two seeds, enough steps
for each task to beat its trivial baseline; under an hour on 2 cores). Timings are in README.

A user with real data and a GPU keeps the pipeline and swaps the parts: ``constructions`` for
their IMAX/DMAX entries, ``zoo`` for pretrained checkpoints, ``TrainConfig`` for their budget.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from dynamics.experiments.imax_dmax.train import TrainConfig
from dynamics.experiments.imax_dmax.zoo import ARCHITECTURES, Dims


@dataclass(frozen=True)
class Preset:
    """Everything that fixes the experiment (``fingerprint`` guards a resumed output folder)."""

    name: str
    models: tuple[str, ...]
    seeds: tuple[int, ...]
    n_images: int  # IMAX images; DMAX gets ~4.1 times as many, one task each
    n_eval: int  # evaluation images, every one carrying all seven tasks
    size: int = 48
    heterogeneity: float = 1.0
    data_seed: int = 0
    eval_sources: str = "all"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in ARCHITECTURES]
        if unknown:
            raise ValueError(f"unknown architectures {unknown}; choose from {sorted(ARCHITECTURES)}")
        if not self.models or not self.seeds:
            raise ValueError("a preset needs at least one model and one seed")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.models)) != len(self.models):
            raise ValueError(f"models and seeds must not repeat: {self.models}, {self.seeds}")

    def with_overrides(self, *, models=None, seeds=None, heterogeneity: float | None = None) -> Preset:
        """The preset with other models / seeds / heterogeneity (None keeps the preset's)."""
        return replace(
            self,
            models=tuple(models) if models else self.models,
            seeds=tuple(int(s) for s in seeds) if seeds else self.seeds,
            heterogeneity=self.heterogeneity if heterogeneity is None else float(heterogeneity),
        )

    def fingerprint(self) -> str:
        """Hash of everything a finished run depends on except the model and seed lists."""
        d = asdict(self)
        for k in ("name", "models", "seeds"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return asdict(self) | {"fingerprint": self.fingerprint()}


def preset_from_json(d: dict) -> Preset:
    """Inverse of ``Preset.to_json`` (the fingerprint is recomputed, not read)."""
    d = {k: v for k, v in d.items() if k != "fingerprint"}
    train = dict(d.pop("train"))
    train["dims"] = Dims(**train["dims"])
    return Preset(
        **{**d, "models": tuple(d["models"]), "seeds": tuple(d["seeds"])}, train=TrainConfig(**train)
    )


QUICK = Preset(
    name="quick",
    models=("idefics3", "qwen2_vl"),
    seeds=(0,),
    n_images=300,
    n_eval=50,
    train=TrainConfig(epochs=4.0, batch_size=32, learning_rate=1e-3, probe_every=20, probe_size=28),
)

# 12 epochs (~4,200 steps) is what the slowest-learning task (the CTR) needs at this width; the
# five architectures are the zoo's fastest learners that also fit the hour on 2 cores
# (mistral3 is ~4x slower per step, paligemma's edema grading stayed at chance in this budget).
FULL = Preset(
    name="full",
    models=("llava", "qwen2_vl", "idefics3", "internvl", "gemma3"),
    seeds=(0, 1),
    n_images=1500,
    n_eval=200,
    train=TrainConfig(epochs=12.0, batch_size=32, learning_rate=1e-3, probe_every=60, probe_size=28),
)

PRESETS = {p.name: p for p in (QUICK, FULL)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


__all__ = ["Preset", "QUICK", "FULL", "PRESETS", "get_preset", "preset_from_json", "Dims"]
