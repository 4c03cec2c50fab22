"""IMAX (image-centric) and DMAX (decentralised) training sets with identical per-task entry counts.

IMAX (arXiv 2504.09967): every image carries several tasks, on average ``tasks_per_image = 4.10``
tasks and ``entries_per_image = 7.46`` entries. With ``N`` images we fix the totals
``T = round(4.10 N)`` (image-task pairs) and ``E = round(7.46 N)`` (entries), so the printed
densities are T/N and E/N exactly (within 0.5/N of the paper's):

1. tasks per image ``k_i ~ clip(round(Normal(4.10, 1.3)), 1, 7)``, then nudged one image at a time
   until ``sum k_i = T``; each image gets ``k_i`` distinct tasks drawn uniformly;
2. every image-task pair gets one entry, and the ``E - T`` extra entries are spread uniformly over
   the spare "slots" (a pair has ``capacity - 1`` spare slots: one per further object or question;
   the four single-question tasks have none), so multi-entry tasks (REC, REG, VQA) take the extras;
3. each image's acquisition source is drawn uniformly (balanced) from all sources.

DMAX copies IMAX's per-task structure exactly: for every IMAX pair (image, task) with ``m`` entries
it makes one *fresh* image of task ``task``'s own source ("home" source ``sources[task_index]``)
with the same ``m`` entries. Hence per-task entry counts (and the per-task entries-per-image
distribution) are identical, no image carries two tasks, and each task's images come from one
source - the decentralised construction of aggregated public datasets.

DMAX-mixed is the density-only control: DMAX's structure (the same per-task multiplicities, one
task per fresh image) with each image's source drawn balanced from all sources, as IMAX's are. So
IMAX vs DMAX-mixed differ only in density (4.10 tasks per image vs 1), DMAX vs DMAX-mixed only in
source coverage (each task from its home source vs from all).

The common probe set is one more draw of fresh images from all sources, every image with all seven
tasks: every arm's Fisher spectrum is also measured on the same task-stratified batch of it.

The evaluation set is shared by every construction: ``n_eval`` fresh images, every one carrying all
seven tasks with one entry each (a random object / question for REC, REG, VQA). Its sources are
all sources in turn by default (``eval_sources="all"``), or each task's home source (``"home"``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from dynamics.experiments.imax_dmax.phantoms import Phantom, sample_phantom
from dynamics.experiments.imax_dmax.sources import SOURCE_SEED, SourceStyle, make_sources, render_styled
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES, Candidate, candidates

PAPER_TASKS_PER_IMAGE = 4.10
PAPER_ENTRIES_PER_IMAGE = 7.46


def home_source(task: str) -> int:
    """Index of the source DMAX draws ``task``'s images from (its "home" dataset)."""
    return TASK_NAMES.index(task)


@dataclass
class ImageRecord:
    """One rendered image: id, source index, phantom (ground truth), pixels (H x W float32), pixel boxes."""

    image_id: int
    source: int
    phantom: Phantom
    pixels: np.ndarray
    boxes: dict[str, tuple[float, float, float, float]]


@dataclass(frozen=True)
class Entry:
    """One instruction-answer pair about one image."""

    image_id: int
    task: str
    key: str
    instruction: str
    answer: str
    truth: object = field(default=None, compare=False)

    @classmethod
    def from_candidate(cls, image_id: int, c: Candidate) -> Entry:
        return cls(image_id, c.task, c.key, c.instruction, c.answer, c.truth)


@dataclass
class Construction:
    """A named set of images and entries (IMAX, DMAX or the evaluation set)."""

    name: str
    images: dict[int, ImageRecord]
    entries: list[Entry]

    def home_mask(self, entries: list[Entry] | None = None) -> list[bool]:
        """Per entry (default: all of this construction's): is its image from the task's home source?

        On the shared evaluation set this splits each task into the source a DMAX model of that
        task trained on ("home", see ``home_source``) and the sources it never saw ("shifted").
        """
        es = self.entries if entries is None else entries
        return [self.images[e.image_id].source == home_source(e.task) for e in es]

    def source_split(self, entries: list[Entry] | None = None) -> dict[str, list[int]]:
        """``{"home": indices, "shifted": indices}`` into ``entries`` (default: this construction's),
        by ``home_mask``: the split that evaluation scores and baselines are both computed on."""
        mask = self.home_mask(entries)
        return {
            "home": [i for i, h in enumerate(mask) if h],
            "shifted": [i for i, h in enumerate(mask) if not h],
        }

    def stats(self) -> dict:
        """Densities and per-task counts: tasks/image, entries/image, entries and images per task."""
        n_img = len(self.images)
        pairs = {(e.image_id, e.task) for e in self.entries}
        per_task = Counter(e.task for e in self.entries)
        img_per_task = Counter(t for _, t in pairs)
        src_per_task = {t: sorted({self.images[i].source for i, tt in pairs if tt == t}) for t in TASK_NAMES}
        return {
            "name": self.name,
            "images": n_img,
            "entries": len(self.entries),
            "tasks_per_image": len(pairs) / n_img if n_img else 0.0,
            "entries_per_image": len(self.entries) / n_img if n_img else 0.0,
            "entries_per_task": {t: per_task.get(t, 0) for t in TASK_NAMES},
            "images_per_task": {t: img_per_task.get(t, 0) for t in TASK_NAMES},
            "sources_per_task": src_per_task,
        }

    def describe(self) -> str:
        """Human-readable density summary (what the builder prints)."""
        s = self.stats()
        lines = [
            f"{s['name']}: {s['images']} images, {s['entries']} entries, "
            f"{s['tasks_per_image']:.2f} tasks/image, {s['entries_per_image']:.2f} entries/image",
            "  entries per task: " + ", ".join(f"{t}={n}" for t, n in s["entries_per_task"].items()),
        ]
        return "\n".join(lines)


class _ImageFactory:
    """Draws phantoms and renders them with a source style; ids are unique across all constructions."""

    def __init__(self, sources: list[SourceStyle], size: int, seed: int, first_id: int):
        self.sources = sources
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.next_id = first_id

    def make(self, source: int) -> ImageRecord:
        ph = sample_phantom(self.rng)
        pixels, boxes = render_styled(ph, self.sources[source], self.size, self.rng)
        rec = ImageRecord(self.next_id, source, ph, pixels, boxes)
        self.next_id += 1
        return rec

    def cands(self, rec: ImageRecord, task: str) -> list[Candidate]:
        return candidates(task, rec.phantom, rec.boxes, self.size, self.rng)


def _balanced(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``n`` draws from range(k), each value appearing floor(n/k) or ceil(n/k) times, shuffled."""
    return rng.permutation(np.resize(rng.permutation(k), n))


def _tasks_per_image(rng: np.random.Generator, n: int, total: int) -> np.ndarray:
    k = np.clip(np.rint(rng.normal(PAPER_TASKS_PER_IMAGE, 1.3, n)), 1, len(TASK_NAMES)).astype(int)
    while k.sum() != total:
        i = int(rng.integers(n))
        if k.sum() < total and k[i] < len(TASK_NAMES):
            k[i] += 1
        elif k.sum() > total and k[i] > 1:
            k[i] -= 1
    return k


def build_imax(
    n_images: int,
    *,
    sources: list[SourceStyle],
    size: int,
    seed: int,
    tasks_per_image: float = PAPER_TASKS_PER_IMAGE,
    entries_per_image: float = PAPER_ENTRIES_PER_IMAGE,
    first_id: int = 0,
) -> Construction:
    """Image-centric construction with the given densities (see module docstring)."""
    if n_images < 10:
        raise ValueError(f"n_images must be >= 10 to hit the target densities, got {n_images}")
    if not 1.0 <= tasks_per_image <= len(TASK_NAMES) or entries_per_image < tasks_per_image:
        raise ValueError(
            f"need 1 <= tasks_per_image <= {len(TASK_NAMES)} and entries_per_image >= tasks_per_image, "
            f"got {tasks_per_image}, {entries_per_image}"
        )
    fac = _ImageFactory(sources, size, seed, first_id)
    rng = np.random.default_rng([seed, 1])
    total_pairs = int(round(tasks_per_image * n_images))
    total_entries = int(round(entries_per_image * n_images))
    src = _balanced(rng, n_images, len(sources))
    ks = _tasks_per_image(rng, n_images, total_pairs)
    images: dict[int, ImageRecord] = {}
    pair_cands: list[tuple[int, list[Candidate]]] = []
    for i in range(n_images):
        rec = fac.make(int(src[i]))
        images[rec.image_id] = rec
        for t in rng.choice(len(TASK_NAMES), size=ks[i], replace=False):
            pair_cands.append((rec.image_id, fac.cands(rec, TASK_NAMES[int(t)])))
    spare = [p for p, (_, cs) in enumerate(pair_cands) for _ in range(len(cs) - 1)]
    n_extra = total_entries - total_pairs
    if n_extra > len(spare):
        raise ValueError(
            f"cannot place {n_extra} extra entries in {len(spare)} spare slots; lower entries_per_image"
        )
    mult = np.ones(len(pair_cands), dtype=int)
    np.add.at(mult, rng.choice(np.asarray(spare, dtype=int), size=n_extra, replace=False), 1)
    entries = [
        Entry.from_candidate(img, c) for (img, cs), m in zip(pair_cands, mult, strict=True) for c in cs[:m]
    ]
    return Construction("IMAX", images, entries)


def build_dmax(
    imax: Construction, *, sources: list[SourceStyle], size: int, seed: int, first_id: int
) -> Construction:
    """Decentralised twin of ``imax``: same per-task multiplicities, fresh single-task home-source images."""
    if len(sources) < len(TASK_NAMES):
        raise ValueError(f"DMAX needs one source per task ({len(TASK_NAMES)}), got {len(sources)}")
    fac = _ImageFactory(sources, size, seed, first_id)
    mult = Counter((e.image_id, e.task) for e in imax.entries)
    images: dict[int, ImageRecord] = {}
    entries: list[Entry] = []
    for (_, task), m in sorted(mult.items(), key=lambda kv: (TASK_NAMES.index(kv[0][1]), kv[0][0])):
        home = home_source(task)
        for _attempt in range(100):
            rec = fac.make(home)
            cs = fac.cands(rec, task)
            if len(cs) >= m:
                break
        else:  # pragma: no cover - capacities of 3+ objects make this unreachable for m <= 3
            raise RuntimeError(f"could not draw a {task} image with {m} distinct entries")
        images[rec.image_id] = rec
        entries.extend(Entry.from_candidate(rec.image_id, c) for c in cs[:m])
    return Construction("DMAX", images, entries)


def build_dmax_mixed(
    imax: Construction, *, sources: list[SourceStyle], size: int, seed: int, first_id: int
) -> Construction:
    """Density-only control: DMAX's one-task-per-image structure, sources balanced over all of them."""
    fac = _ImageFactory(sources, size, seed, first_id)
    rng = np.random.default_rng([seed, 3])
    mult = Counter((e.image_id, e.task) for e in imax.entries)
    groups = sorted(mult.items(), key=lambda kv: (TASK_NAMES.index(kv[0][1]), kv[0][0]))
    # Balanced within each task, so every task sees every source about equally often (as in IMAX).
    src_of: dict[tuple[int, str], int] = {}
    for task in TASK_NAMES:
        keys = [k for k, _ in groups if k[1] == task]
        for k, s in zip(keys, _balanced(rng, len(keys), len(sources)), strict=True):
            src_of[k] = int(s)
    images: dict[int, ImageRecord] = {}
    entries: list[Entry] = []
    for key, m in groups:
        task = key[1]
        for _attempt in range(100):
            rec = fac.make(src_of[key])
            cs = fac.cands(rec, task)
            if len(cs) >= m:
                break
        else:  # pragma: no cover - as in build_dmax
            raise RuntimeError(f"could not draw a {task} image with {m} distinct entries")
        images[rec.image_id] = rec
        entries.extend(Entry.from_candidate(rec.image_id, c) for c in cs[:m])
    return Construction("DMAX-mixed", images, entries)


def build_eval(
    n_images: int,
    *,
    sources: list[SourceStyle],
    size: int,
    seed: int,
    first_id: int,
    eval_sources: str = "all",
) -> Construction:
    """Shared evaluation set: every image carries all seven tasks, one entry each."""
    if eval_sources not in ("all", "home"):
        raise ValueError(f"eval_sources must be 'all' or 'home', got {eval_sources!r}")
    fac = _ImageFactory(sources, size, seed, first_id)
    rng = np.random.default_rng([seed, 2])
    images: dict[int, ImageRecord] = {}
    entries: list[Entry] = []
    if eval_sources == "all":
        src = _balanced(rng, n_images, len(sources))
        for i in range(n_images):
            rec = fac.make(int(src[i]))
            images[rec.image_id] = rec
            entries.extend(Entry.from_candidate(rec.image_id, fac.cands(rec, t)[0]) for t in TASK_NAMES)
    else:
        for t in TASK_NAMES:
            for _ in range(n_images):
                rec = fac.make(home_source(t))
                images[rec.image_id] = rec
                entries.append(Entry.from_candidate(rec.image_id, fac.cands(rec, t)[0]))
    return Construction("eval", images, entries)


ARMS = ("IMAX", "DMAX", "DMAX-mixed", "DMAX-3stage")
# The training set each arm starts from (DMAX-3stage's stage 1 is DMAX; see pseudo.py for stage 2).
ARM_DATA = {"IMAX": "IMAX", "DMAX": "DMAX", "DMAX-mixed": "DMAX-mixed", "DMAX-3stage": "DMAX"}


def check_arm(arm: str) -> str:
    """The canonical spelling of ``arm`` (case-insensitive), or a ValueError naming the choices."""
    by_lower = {a.lower(): a for a in ARMS}
    if arm.lower() not in by_lower:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    return by_lower[arm.lower()]


@dataclass
class DataBundle:
    """Everything one experiment trains, probes and evaluates on."""

    imax: Construction
    dmax: Construction
    eval: Construction
    sources: list[SourceStyle]
    size: int
    heterogeneity: float
    dmax_mixed: Construction | None = None
    probe: Construction | None = None
    seeds: dict[str, int] = field(default_factory=dict)

    def train(self, construction: str) -> Construction:
        """The training set of an arm (DMAX-3stage: its stage-1 data, DMAX)."""
        key = ARM_DATA[check_arm(construction)]
        out = {"IMAX": self.imax, "DMAX": self.dmax, "DMAX-mixed": self.dmax_mixed}[key]
        if out is None:
            raise ValueError(f"this bundle was built without {key}")
        return out


def build_bundle(
    n_images: int,
    n_eval: int,
    *,
    size: int = 48,
    heterogeneity: float = 1.0,
    seed: int = 0,
    eval_sources: str = "all",
    style_seed: int = 0,
    n_probe: int = 8,
    verbose: bool = False,
) -> DataBundle:
    """IMAX, its DMAX and DMAX-mixed twins, the common probe set and the shared evaluation set.

    ``seed`` (the data seed) draws every image and entry (independent streams per construction);
    ``style_seed`` draws the seven sources' acquisition styles (``SOURCE_SEED + style_seed``), so
    the two can be varied separately. ``n_probe`` images (all sources, all tasks) form the common probe set.
    """
    sources = make_sources(len(TASK_NAMES), heterogeneity, style_seed=SOURCE_SEED + int(style_seed))
    ss = np.random.SeedSequence(seed)
    # The first three streams are the ones earlier versions drew, so IMAX / DMAX / eval are unchanged.
    s_imax, s_dmax, s_eval, s_mixed, s_probe = (int(s.generate_state(1)[0]) for s in ss.spawn(5))
    imax = build_imax(n_images, sources=sources, size=size, seed=s_imax, first_id=0)
    dmax = build_dmax(imax, sources=sources, size=size, seed=s_dmax, first_id=1_000_000)
    ev = build_eval(
        n_eval, sources=sources, size=size, seed=s_eval, first_id=2_000_000, eval_sources=eval_sources
    )
    mixed = build_dmax_mixed(imax, sources=sources, size=size, seed=s_mixed, first_id=3_000_000)
    probe = build_eval(n_probe, sources=sources, size=size, seed=s_probe, first_id=4_000_000)
    probe.name = "probe"
    if verbose:
        print(imax.describe())
        print(dmax.describe())
        print(mixed.describe())
        print(f"eval: {len(ev.images)} images, {len(ev.entries)} entries ({n_eval} per task)")
    return DataBundle(
        imax, dmax, ev, sources, size, heterogeneity, dmax_mixed=mixed, probe=probe,
        seeds={"data_seed": int(seed), "style_seed": int(style_seed)},
    )  # fmt: skip
