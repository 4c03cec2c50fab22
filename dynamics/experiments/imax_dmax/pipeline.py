"""``dynamics reproduce imax-dmax``: data, every run, statistics, figures, report; resumable.

Layout of the output folder ``OUT``::

    config.json        the preset (and its fingerprint, which a resumed run must match)
    data.json          the builder's density statistics (IMAX, DMAX, eval)
    baselines.json     majority and blind baselines on the evaluation set
    runs/<model>-<construction>-s<seed>/   one run store per run (DONE marks a finished one)
    results.md         tables read back from the run stores (see results.py)
    figures/           the pipeline's figures, and figures/report/ with the report's pages
    report.pdf         dynamics.report.build_report on all runs

A run whose folder has no ``DONE`` (interrupted) is deleted and retrained; finished runs are
never retrained, so rerunning the same command after a crash continues where it stopped, and
adding models or seeds only trains the new runs.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from dynamics.experiments.imax_dmax.constructions import build_bundle
from dynamics.experiments.imax_dmax.metrics import baseline_scores
from dynamics.experiments.imax_dmax.presets import FULL, QUICK, Preset
from dynamics.experiments.imax_dmax.train import DONE_FILE, train_run

CONSTRUCTIONS = ("IMAX", "DMAX")


def run_name(model: str, construction: str, seed: int) -> str:
    return f"{model}-{construction}-s{seed}"


def _check_config(out: Path, preset: Preset) -> None:
    cfg = out / "config.json"
    if cfg.exists():
        old = json.loads(cfg.read_text()).get("fingerprint")
        if old != preset.fingerprint():
            raise ValueError(
                f"{out} holds runs of a different configuration (fingerprint {old}, now "
                f"{preset.fingerprint()}): data, heterogeneity or training settings changed. "
                "Use a new --out folder, or delete the old one to start over."
            )
    cfg.write_text(json.dumps(preset.to_json(), indent=2) + "\n")


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc="imax-dmax", disable=not enabled, dynamic_ncols=True, smoothing=0.05)


def reproduce(
    out: str | Path,
    *,
    quick: bool = False,
    models: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    heterogeneity: float | None = None,
    progress: bool = True,
    preset: Preset | None = None,
) -> Path:
    """Train every model x {IMAX, DMAX} x seed, evaluate, analyse and report into ``out``.

    Args:
        out: output folder (created; reused for resuming).
        quick: the quick preset (else the full one); ``preset`` overrides both.
        models, seeds, heterogeneity: override the preset's (None keeps them).
        progress: show a progress bar with ETA over all training steps.

    Returns:
        The path of ``results.md``.
    """
    base = preset if preset is not None else (QUICK if quick else FULL)
    p = base.with_overrides(models=models, seeds=seeds, heterogeneity=heterogeneity)
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    _check_config(out, p)
    t0 = time.perf_counter()

    bundle = build_bundle(
        p.n_images, p.n_eval, size=p.size, heterogeneity=p.heterogeneity, seed=p.data_seed,
        eval_sources=p.eval_sources, verbose=progress,
    )  # fmt: skip
    data = {"IMAX": bundle.imax.stats(), "DMAX": bundle.dmax.stats(), "eval": bundle.eval.stats()}
    (out / "data.json").write_text(json.dumps(data, indent=2) + "\n")
    baselines = {k: baseline_scores(bundle.eval.entries, k) for k in ("majority", "blind")}
    (out / "baselines.json").write_text(json.dumps(baselines, indent=2) + "\n")

    plan = [(m, c, s) for m in p.models for s in p.seeds for c in CONSTRUCTIONS]
    run_dirs = [out / "runs" / run_name(*r) for r in plan]
    pending = [(r, d) for r, d in zip(plan, run_dirs, strict=True) if not (d / DONE_FILE).exists()]
    steps = p.train.steps(len(bundle.imax.entries))
    if progress:
        print(f"{len(plan) - len(pending)} of {len(plan)} runs already done; training {len(pending)}")
    bar = _progress_bar(steps * len(pending), progress)
    try:
        for (model, construction, seed), run_dir in pending:
            if run_dir.exists():  # an interrupted run: start it over rather than append to it
                shutil.rmtree(run_dir)
            bar.set_postfix_str(run_name(model, construction, seed))
            train_run(
                bundle, construction=construction, model=model, seed=seed, run_dir=run_dir, cfg=p.train,
                progress=bar.update,
            )  # fmt: skip
    finally:
        bar.close()
    train_s = time.perf_counter() - t0
    path = analyse(out, run_dirs, p, data, baselines, progress=progress)
    if progress:
        print(f"done in {time.perf_counter() - t0:.0f} s (training {train_s:.0f} s): {path}")
    return path


def analyse(out: Path, run_dirs: list[Path], preset: Preset, data: dict, baselines: dict, *, progress: bool = True) -> Path:
    """Figures, results.md and report.pdf from the run stores in ``run_dirs``."""
    from dynamics import load_runs
    from dynamics.experiments.imax_dmax.figures import draw_all
    from dynamics.experiments.imax_dmax.results import run_scores, write_results

    runset = load_runs([str(d) for d in run_dirs])
    per_run = run_scores(runset)
    figs = draw_all(runset, per_run, baselines, out / "figures")
    write_results(out, runset, preset.to_json(), data, baselines, [str(f.relative_to(out)) for f in figs])
    try:
        from dynamics.report import build_report
    except ImportError:  # pragma: no cover - the report ships with the package
        build_report = None
    if build_report is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_report(
                [str(d) for d in run_dirs],
                out / "report.pdf",
                group="construction",
                pair=["model", "seed"],
                # The stored overall score: the mean of the seven normalised task scores.
                target="score/all/multitask_score",
                figures_dir=out / "figures" / "report",
                title=f"IMAX vs DMAX ({preset.name} preset)",
                progress=progress,
            )
    return out / "results.md"
