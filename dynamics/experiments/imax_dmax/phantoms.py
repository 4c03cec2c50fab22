"""Procedural chest-X-ray phantoms with exact ground truth.

A phantom is drawn in *canonical* coordinates (the unit square, y pointing down, patient facing the
viewer, so the patient's right lung is on the image's left as on a real PA film) and then mapped to
pixels by a source's field of view (``sources.py``). Everything a task asks about is a closed-form
function of the sampled geometry, so the ground truth is exact rather than annotated:

* thorax: ellipse with centre ``(cx, cy)`` and half-axes ``(a, b)``; thoracic width ``W_t = 2a``;
* lungs: two ellipses inside the thorax;
* heart: ellipse of half-width ``h_w = CTR * a``, so the cardiothoracic ratio is exactly
  ``CTR = W_h / W_t = 2 h_w / 2a`` (sampled, not measured; a uniform zoom of the field of view keeps it);
* findings: cardiomegaly (``CTR > 0.5``), pleural effusion (a side, a fluid level at the lung base),
  nodule (small dense disc in a lung zone), opacity (larger soft consolidation in a lung zone) and
  pulmonary oedema of grade 0-3 (a diffuse, perihilar-weighted haze whose density grows with grade).

Bounding boxes are the exact extents of the drawn shapes (ellipse extents, the fluid region, disc
extents) after the field-of-view map, in pixels. ``render`` returns the clean intensity image in
[0, 1] before source styling (contrast curve, noise, blur, artefacts), which ``sources.py`` applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIDES = ("right", "left")
ZONES = ("upper", "lower")
EDEMA_GRADES = ("none", "mild", "moderate", "severe")
FINDINGS = ("cardiomegaly", "effusion", "nodule", "opacity", "edema")
CARDIOMEGALY_CTR = 0.5
CTR_RANGE = (0.36, 0.64)

# Prevalences chosen so that every label is neither rare nor near-certain: a trivial (majority)
# baseline then sits well below a model that reads the image.
EFFUSION_P = 0.4
NODULE_P = 0.4
OPACITY_P = 0.4
EDEMA_GRADE_P = (0.4, 0.2, 0.2, 0.2)


@dataclass(frozen=True)
class Lesion:
    """A focal finding: ``side`` in SIDES, ``zone`` in ZONES, centre and radius in canonical units."""

    side: str
    zone: str
    x: float
    y: float
    r: float


@dataclass(frozen=True)
class Phantom:
    """Sampled geometry and findings of one synthetic chest X-ray (canonical coordinates)."""

    cx: float
    cy: float
    a: float
    b: float
    ctr: float
    effusion: str | None  # None or a side
    effusion_level: float  # fraction of the lung height filled with fluid (0 when no effusion)
    nodule: Lesion | None
    opacity: Lesion | None
    edema: int  # 0..3
    texture_seed: int
    extras: dict = field(default_factory=dict, compare=False)

    # --- derived anatomy (canonical units) -------------------------------------------------
    def lung(self, side: str) -> tuple[float, float, float, float]:
        """Ellipse (x, y, half-width, half-height) of the lung on the patient's ``side``."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        sign = -1.0 if side == "right" else 1.0  # patient's right = image left
        return (self.cx + sign * 0.5 * self.a, self.cy - 0.08 * self.b, 0.40 * self.a, 0.74 * self.b)

    def heart(self) -> tuple[float, float, float, float]:
        """Ellipse (x, y, half-width, half-height); half-width = CTR * a by construction."""
        hw = self.ctr * self.a
        return (self.cx + 0.10 * self.a, self.cy + 0.50 * self.b, hw, 0.36 * self.b)

    @property
    def cardiomegaly(self) -> bool:
        return self.ctr > CARDIOMEGALY_CTR

    def labels(self) -> dict[str, bool]:
        """Multi-label ground truth over FINDINGS (oedema counts from grade 1 up)."""
        return {
            "cardiomegaly": self.cardiomegaly,
            "effusion": self.effusion is not None,
            "nodule": self.nodule is not None,
            "opacity": self.opacity is not None,
            "edema": self.edema >= 1,
        }

    def effusion_top(self) -> float:
        """Canonical y of the fluid level (only meaningful when there is an effusion)."""
        _, ly, _, lh = self.lung(self.effusion or "right")
        return ly + lh - 2.0 * lh * self.effusion_level

    def canonical_boxes(self) -> dict[str, tuple[float, float, float, float]]:
        """Exact extents (x0, y0, x1, y1) of every nameable region, canonical units."""
        boxes: dict[str, tuple[float, float, float, float]] = {}
        for side in SIDES:
            x, y, w, h = self.lung(side)
            boxes[f"{side} lung"] = (x - w, y - h, x + w, y + h)
        x, y, w, h = self.heart()
        boxes["heart"] = (x - w, y - h, x + w, y + h)
        if self.effusion is not None:
            x, y, w, h = self.lung(self.effusion)
            top = self.effusion_top()
            # Chord of the lung ellipse at the fluid level bounds the fluid horizontally.
            t = np.clip((top - y) / h, -1.0, 1.0)
            half = w * float(np.sqrt(max(0.0, 1.0 - t * t)))
            if top > y:  # below the equator the widest point of the fluid is at its top
                boxes["effusion"] = (x - half, top, x + half, y + h)
            else:
                boxes["effusion"] = (x - w, top, x + w, y + h)
        for name in ("nodule", "opacity"):
            les = getattr(self, name)
            if les is not None:
                boxes[name] = (les.x - les.r, les.y - les.r, les.x + les.r, les.y + les.r)
        return boxes


def _zone_centre(p_lung: tuple[float, float, float, float], zone: str, rng: np.random.Generator):
    x, y, w, h = p_lung
    dy = -0.42 * h if zone == "upper" else 0.30 * h
    return x + rng.uniform(-0.25, 0.25) * w, y + dy + rng.uniform(-0.10, 0.10) * h


def sample_phantom(rng: np.random.Generator) -> Phantom:
    """Draw one phantom: geometry jitter, CTR ~ U(CTR_RANGE) and independent findings.

    Nodule and opacity, when both present, are put in different (side, zone) cells so that their
    boxes are distinct objects for the referring-expression tasks.
    """
    cx = 0.5 + rng.uniform(-0.02, 0.02)
    cy = 0.52 + rng.uniform(-0.02, 0.02)
    a = rng.uniform(0.37, 0.42)
    b = rng.uniform(0.36, 0.41)
    ctr = float(rng.uniform(*CTR_RANGE))
    effusion = str(rng.choice(SIDES)) if rng.random() < EFFUSION_P else None
    level = float(rng.uniform(0.22, 0.32)) if effusion else 0.0
    base = Phantom(cx, cy, a, b, ctr, effusion, level, None, None, 0, 0)

    cells = [(s, z) for s in SIDES for z in ZONES]
    # Keep focal lesions out of the fluid: an effusion hides the lower zone of its side.
    if effusion is not None:
        cells.remove((effusion, "lower"))
    order = rng.permutation(len(cells))
    nodule = opacity = None
    if rng.random() < NODULE_P:
        side, zone = cells[order[0]]
        x, y = _zone_centre(base.lung(side), zone, rng)
        nodule = Lesion(side, zone, float(x), float(y), float(rng.uniform(0.055, 0.065)))
    if rng.random() < OPACITY_P:
        side, zone = cells[order[1]]
        x, y = _zone_centre(base.lung(side), zone, rng)
        opacity = Lesion(side, zone, float(x), float(y), float(rng.uniform(0.100, 0.120)))
    edema = int(rng.choice(4, p=EDEMA_GRADE_P))
    return Phantom(
        cx, cy, a, b, ctr, effusion, level, nodule, opacity, edema, int(rng.integers(0, 2**31 - 1))
    )


def _ellipse(xx, yy, x, y, w, h, soft):
    """Soft indicator of an ellipse: 1 inside, 0 outside, a logistic edge ``soft`` wide (pixels)."""
    d = np.sqrt(((xx - x) / w) ** 2 + ((yy - y) / h) ** 2)
    return 1.0 / (1.0 + np.exp((d - 1.0) * min(w, h) / soft))


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Zero-mean unit-ish low-frequency texture: coarse Gaussian grid, bilinearly upsampled."""
    n = max(2, size // scale + 2)
    coarse = rng.standard_normal((n, n))
    src = np.linspace(0, n - 1, size)
    i0 = np.floor(src).astype(int).clip(0, n - 2)
    f = src - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def to_pixels(
    box: tuple[float, float, float, float], size: int, zoom: float, shift: tuple[float, float]
) -> tuple[float, float, float, float]:
    """Map a canonical box to pixels under the field-of-view map ``p = ((c - 0.5) * zoom + 0.5 + shift) * size``."""
    x0, y0, x1, y1 = box
    fx = lambda v: ((v - 0.5) * zoom + 0.5 + shift[0]) * size  # noqa: E731
    fy = lambda v: ((v - 0.5) * zoom + 0.5 + shift[1]) * size  # noqa: E731
    return (fx(x0), fy(y0), fx(x1), fy(y1))


def render(
    ph: Phantom, size: int = 48, zoom: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)
) -> tuple[np.ndarray, dict[str, tuple[float, float, float, float]]]:
    """Clean intensity image (size x size, float32 in [0, 1]) and pixel boxes of every region.

    Pixel centre (i, j) sits at canonical ``((j + 0.5)/size - 0.5 - shift_x)/zoom + 0.5`` (inverse of
    ``to_pixels``), so shapes and boxes agree exactly. Intensities (denser = brighter): air 0,
    soft tissue 0.50, aerated lung 0.12, mediastinum 0.62, heart 0.80, effusion 0.78, nodule 0.95,
    opacity +0.45 on top of what it overlaps; oedema raises lung density by 0.09 per grade, twice as much near the hila.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    if zoom <= 0:
        raise ValueError(f"zoom must be positive, got {zoom}")
    px = ((np.arange(size) + 0.5) / size - 0.5 - shift[0]) / zoom + 0.5
    py = ((np.arange(size) + 0.5) / size - 0.5 - shift[1]) / zoom + 0.5
    xx, yy = np.meshgrid(px, py)
    soft = 0.6 / (size * zoom)  # ~0.6 pixel logistic edge, in canonical units
    rng = np.random.default_rng(ph.texture_seed)

    img = 0.50 * _ellipse(xx, yy, ph.cx, ph.cy, ph.a, ph.b, soft)
    # Mediastinum / spine: a vertical dense band between the lungs.
    band = np.exp(-(((xx - ph.cx) / (0.12 * ph.a)) ** 2)) * (yy > ph.cy - 0.9 * ph.b) * (yy < ph.cy + ph.b)
    img = img + 0.12 * band
    texture = _smooth_noise(rng, size, 4)
    for side in SIDES:
        lx, ly, lw, lh = ph.lung(side)
        m = _ellipse(xx, yy, lx, ly, lw, lh, soft)
        dens = 0.12 + 0.025 * texture
        if ph.edema:
            hilum = np.exp(-(((xx - ph.cx) / (0.55 * ph.a)) ** 2 + ((yy - ly) / (0.6 * lh)) ** 2))
            dens = dens + 0.09 * ph.edema * (0.6 + 0.8 * hilum)
        if ph.effusion == side:
            fluid = 1.0 / (1.0 + np.exp(-(yy - ph.effusion_top()) / soft))
            dens = dens * (1 - fluid) + 0.78 * fluid
        img = img * (1 - m) + dens * m
    hx, hy, hw, hh = ph.heart()
    hm = _ellipse(xx, yy, hx, hy, hw, hh, soft)
    img = img * (1 - hm) + 0.80 * hm
    if ph.opacity is not None:
        o = ph.opacity
        om = np.exp(-(((xx - o.x) ** 2 + (yy - o.y) ** 2) / (o.r**2)) * 1.2)
        img = img + 0.45 * om  # densities add on a projection image
    if ph.nodule is not None:
        n = ph.nodule
        img = np.maximum(img, 0.95 * _ellipse(xx, yy, n.x, n.y, n.r, n.r, soft))
    boxes = {k: to_pixels(v, size, zoom, shift) for k, v in ph.canonical_boxes().items()}
    return np.clip(img, 0.0, 1.0).astype(np.float32), boxes
