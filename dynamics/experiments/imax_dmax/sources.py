"""Acquisition "sources": the synthetic analogue of the public datasets DMAX's tasks come from.

Real multi-task X-ray collections mix datasets that differ in scanner, exposure, post-processing,
collimation and burnt-in markers. A :class:`SourceStyle` models one such dataset as a fixed set of
acquisition parameters applied to a clean phantom (``phantoms.render``):

    x_styled = clip( gain * x^gamma + offset  (contrast curve)
                     (*) Gaussian blur of width ``blur``
                     + N(0, noise^2)           (quantum / electronic noise)
                     + artefact ,  0, 1)

with a field of view (``zoom``, ``shift``) applied at rendering time. Every source is a convex
interpolation between a shared *base* style and its own extreme style:

    style_k(h) = base + h * (extreme_k - base),   h = heterogeneity in [0, 1]

so ``h = 0`` makes all sources identical (DMAX then differs from IMAX only by image-task density)
and ``h = 1`` gives the full source shift. Artefact strength and probability scale with ``h`` too.
The extreme styles are drawn from a *style seed* (default ``SOURCE_SEED``): within one experiment
"source 3" means the same style in every run and every construction, and a different style seed is
a different draw of the seven acquisition styles (the presets' ``style_seed`` replicates).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.ndimage import gaussian_filter

from dynamics.experiments.imax_dmax.phantoms import Phantom, render

SOURCE_SEED = 20250414
ARTEFACTS = ("none", "marker", "border", "lines")


@dataclass(frozen=True)
class SourceStyle:
    """Acquisition parameters of one source (see module docstring for the forward model)."""

    name: str
    gamma: float = 1.0
    gain: float = 1.0
    offset: float = 0.0
    noise: float = 0.03
    blur: float = 0.4
    zoom: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    artefact: str = "none"
    artefact_strength: float = 0.0

    def __post_init__(self) -> None:
        if self.artefact not in ARTEFACTS:
            raise ValueError(f"artefact must be one of {ARTEFACTS}, got {self.artefact!r}")
        if self.gamma <= 0 or self.zoom <= 0 or self.noise < 0 or self.blur < 0:
            raise ValueError(f"invalid style parameters in {self!r}: gamma, zoom > 0 and noise, blur >= 0")


BASE = SourceStyle(name="base")


def _extreme(rng: np.random.Generator, k: int) -> SourceStyle:
    return SourceStyle(
        name=f"src{k}",
        gamma=float(np.exp(rng.uniform(-0.45, 0.45))),
        gain=float(rng.uniform(0.75, 1.15)),
        offset=float(rng.uniform(-0.08, 0.12)),
        noise=float(rng.uniform(0.02, 0.08)),
        blur=float(rng.uniform(0.0, 1.1)),
        zoom=float(rng.uniform(0.9, 1.08)),
        shift_x=float(rng.uniform(-0.05, 0.05)),
        shift_y=float(rng.uniform(-0.05, 0.05)),
        artefact=ARTEFACTS[1 + k % 3],
        artefact_strength=float(rng.uniform(0.5, 1.0)),
    )


def make_sources(n: int, heterogeneity: float = 1.0, *, style_seed: int = SOURCE_SEED) -> list[SourceStyle]:
    """``n`` source styles at the given heterogeneity ``h`` in [0, 1], extremes drawn from ``style_seed``."""
    if not 0.0 <= heterogeneity <= 1.0:
        raise ValueError(f"heterogeneity must be in [0, 1], got {heterogeneity}")
    if n < 1:
        raise ValueError(f"need at least one source, got n={n}")
    rng = np.random.default_rng(style_seed)
    h = float(heterogeneity)
    out = []
    for k in range(n):
        ext = _extreme(rng, k)
        mix = {
            f: getattr(BASE, f) + h * (getattr(ext, f) - getattr(BASE, f))
            for f in ("gamma", "gain", "offset", "noise", "blur", "zoom", "shift_x", "shift_y")
        }
        out.append(
            replace(
                BASE,
                name=ext.name,
                artefact=ext.artefact if h > 0 else "none",
                artefact_strength=h * ext.artefact_strength,
                **mix,
            )
        )
    return out


def _artefact(img: np.ndarray, style: SourceStyle, rng: np.random.Generator) -> np.ndarray:
    s = style.artefact_strength
    size = img.shape[0]
    if style.artefact == "none" or s <= 0:
        return img
    img = img.copy()
    if style.artefact == "marker":  # burnt-in side marker in a top corner
        m = max(2, size // 10)
        x0 = int(rng.integers(1, 3)) if rng.random() < 0.5 else size - m - int(rng.integers(1, 3))
        img[1 : 1 + m, x0 : x0 + m] = np.maximum(img[1 : 1 + m, x0 : x0 + m], 0.9 * s + 0.1)
    elif style.artefact == "border":  # collimation: dark frame
        w = max(1, int(round(size * 0.06 * s)))
        img[:w] *= 1 - s
        img[-w:] *= 1 - s
        img[:, :w] *= 1 - s
        img[:, -w:] *= 1 - s
    elif style.artefact == "lines":  # grid-line pattern of a stationary anti-scatter grid
        img = img + 0.06 * s * (np.arange(size)[:, None] % 3 == 0)
    return img


def render_styled(
    ph: Phantom, style: SourceStyle, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, tuple[float, float, float, float]]]:
    """Render ``ph`` as acquired by ``style``: (image float32 in [0, 1], pixel boxes of every region).

    ``rng`` draws the per-image randomness (noise, artefact placement, a small FOV jitter), so one
    phantom rendered twice with the same rng state gives the same image.
    """
    zoom = style.zoom * float(np.exp(rng.uniform(-0.03, 0.03)))
    shift = (style.shift_x + rng.uniform(-0.015, 0.015), style.shift_y + rng.uniform(-0.015, 0.015))
    clean, boxes = render(ph, size=size, zoom=zoom, shift=shift)
    img = style.gain * np.power(clean, style.gamma) + style.offset
    if style.blur > 0:
        img = gaussian_filter(img, style.blur)
    img = img + rng.normal(0.0, style.noise, img.shape)
    img = _artefact(img, style, rng)
    return np.clip(img, 0.0, 1.0).astype(np.float32), boxes
