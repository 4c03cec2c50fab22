"""Presets of the reproduction: data sizes, models, arms, seed replicates, stage 0 and training budget.

* ``quick``: the smoke test of the test suite (one architecture, one replicate, ~100 steps: the
  pipeline and its artefacts, not the science).
* ``main``: README's main command, about 10 minutes on 2 cores: two architectures, one
  replicate, all four arms from pretrained checkpoints. Enough to see whether each task is learned
  and how the arms order; with 2 pairs per arm pair no test can be significant (results.md says so).
* ``full``: the experiment (five architectures x two replicates that differ in data, style and
  init seed, all four arms; 1 h 31 min measured on 2 cores, see README).

A **replicate** is one ``(data_seed, style_seed, init_seed)`` triple: the data seed draws every
image and entry, the style seed the seven sources' acquisition styles, the init seed the model's
random init, its stage-0 corpus and its training order. Runs are paired across arms on (model,
replicate).

A user with real data and a GPU keeps the pipeline and swaps the parts: ``constructions`` for
their IMAX/DMAX entries, ``zoo`` / ``pretrain`` for pretrained checkpoints, ``TrainConfig`` for
their budget (see README.md in this folder).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from dynamics.experiments.imax_dmax.constructions import ARMS, check_arm
from dynamics.experiments.imax_dmax.pretrain import PretrainConfig
from dynamics.experiments.imax_dmax.train import TrainConfig
from dynamics.experiments.imax_dmax.zoo import ARCHITECTURES, Dims

Replicate = tuple[int, int, int]  # (data_seed, style_seed, init_seed)


def replicate_label(r: Replicate) -> str:
    """The ``seed`` tag of a replicate, e.g. ``d0-st1-i2``."""
    return f"d{r[0]}-st{r[1]}-i{r[2]}"


def parse_replicate(spec: str | int) -> Replicate:
    """``"N"`` -> (N, N, N); ``"D:S:I"`` -> (D, S, I) (data, style, init seeds)."""
    parts = str(spec).split(":")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"seed {spec!r} is not N or DATA:STYLE:INIT (e.g. 0 or 1:0:2)") from None
    if len(vals) == 1:
        return (vals[0], vals[0], vals[0])
    if len(vals) != 3:
        raise ValueError(f"seed {spec!r} is not N or DATA:STYLE:INIT (e.g. 0 or 1:0:2)")
    return (vals[0], vals[1], vals[2])


@dataclass(frozen=True)
class Preset:
    """Everything that fixes the experiment (``fingerprint`` guards a resumed output folder)."""

    name: str
    models: tuple[str, ...]
    replicates: tuple[Replicate, ...]
    n_images: int  # IMAX images; DMAX and DMAX-mixed get ~4.1 times as many, one task each
    n_eval: int  # evaluation images, every one carrying all seven tasks
    n_probe: int = 8  # common-probe images (all sources, all tasks)
    arms: tuple[str, ...] = ARMS
    size: int = 48
    heterogeneity: float = 1.0
    eval_sources: str = "all"
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in ARCHITECTURES]
        if unknown:
            raise ValueError(f"unknown architectures {unknown}; choose from {sorted(ARCHITECTURES)}")
        if not self.models or not self.replicates or not self.arms:
            raise ValueError("a preset needs at least one model, one replicate and one arm")
        for a in self.arms:
            check_arm(a)
        if len(set(self.replicates)) != len(self.replicates) or len(set(self.models)) != len(self.models):
            raise ValueError(f"models and seeds must not repeat: {self.models}, {self.replicates}")

    @property
    def seeds(self) -> tuple[str, ...]:
        return tuple(replicate_label(r) for r in self.replicates)

    def with_overrides(
        self,
        *,
        models: Sequence[str] | None = None,
        seeds: Sequence[str | int] | None = None,
        heterogeneity: float | None = None,
        arms: Sequence[str] | None = None,
        finetune: str | None = None,
    ) -> Preset:
        """The preset with other models / seed replicates / heterogeneity / arms / fine-tuning mode
        (None keeps the preset's)."""
        return replace(
            self,
            models=tuple(models) if models else self.models,
            replicates=tuple(parse_replicate(s) for s in seeds) if seeds else self.replicates,
            heterogeneity=self.heterogeneity if heterogeneity is None else float(heterogeneity),
            arms=tuple(check_arm(a) for a in arms) if arms else self.arms,
            train=self.train if finetune is None else replace(self.train, finetune=finetune),
        )

    def fingerprint(self) -> str:
        """Hash of everything a finished run depends on except the model, replicate and arm lists."""
        d = asdict(self)
        for k in ("name", "models", "replicates", "arms"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return asdict(self) | {"fingerprint": self.fingerprint(), "seeds": list(self.seeds)}


def preset_from_json(d: dict) -> Preset:
    """Inverse of ``Preset.to_json`` (the fingerprint is recomputed, not read)."""
    d = {k: v for k, v in d.items() if k not in ("fingerprint", "seeds")}
    train = dict(d.pop("train"))
    train["dims"] = Dims(**train["dims"])
    pre = d.pop("pretrain", None)
    return Preset(
        **{
            **d,
            "models": tuple(d["models"]),
            "replicates": tuple(tuple(r) for r in d["replicates"]),
            "arms": tuple(d["arms"]),
        },
        train=TrainConfig(**train),
        pretrain=PretrainConfig(**pre) if isinstance(pre, dict) else PretrainConfig(),
    )


QUICK = Preset(
    name="quick",
    models=("idefics3",),
    replicates=((0, 0, 0),),
    n_images=120,
    n_eval=28,
    n_probe=4,
    train=TrainConfig(epochs=3.0, batch_size=32, learning_rate=1e-3, probe_every=20, probe_size=14),
    pretrain=PretrainConfig(n_images=256, epochs=2.0),
)

MAIN = Preset(
    name="main",
    models=("idefics3", "qwen2_vl"),
    replicates=((0, 0, 0),),
    n_images=500,
    n_eval=105,
    train=TrainConfig(epochs=5.0, batch_size=32, learning_rate=1e-3, probe_every=40, probe_size=28),
    pretrain=PretrainConfig(n_images=1500, epochs=4.0),
)

# Two replicates that differ in data, style and init seed; 5 epochs (~1,750 steps) from the
# pretrained start. 8 epochs (~2,800 steps) were measured at ~5.5 min a run, ~115 min in all on
# two free cores: too close to the 2 hours the preset must fit.
FULL = Preset(
    name="full",
    models=("llava", "qwen2_vl", "idefics3", "internvl", "gemma3"),
    replicates=((0, 0, 0), (1, 1, 1)),
    n_images=1500,
    n_eval=210,
    train=TrainConfig(epochs=5.0, batch_size=32, learning_rate=1e-3, probe_every=60, probe_size=28),
    pretrain=PretrainConfig(n_images=3000, epochs=4.0),
)

PRESETS = {p.name: p for p in (QUICK, MAIN, FULL)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


__all__ = [
    "Preset",
    "Replicate",
    "QUICK",
    "MAIN",
    "FULL",
    "PRESETS",
    "get_preset",
    "preset_from_json",
    "parse_replicate",
    "replicate_label",
    "Dims",
]
