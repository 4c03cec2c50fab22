"""``dynamics reproduce imax-dmax``: data, every run, statistics, figures, report; resumable.

Layout of the output folder ``OUT``::

    config.json        the preset (and its fingerprint, which a resumed run must match)
    data.json          the builder's density statistics (IMAX, DMAX, eval)
    baselines.json     majority and blind baselines on the evaluation set (and majority per source split)
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
import multiprocessing as mp
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from dynamics.experiments.imax_dmax.constructions import build_bundle
from dynamics.experiments.imax_dmax.metrics import baseline_scores
from dynamics.experiments.imax_dmax.presets import FULL, QUICK, Preset, preset_from_json
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

    return tqdm(
        total=total, unit="step", desc="imax-dmax", disable=not enabled, dynamic_ncols=True, smoothing=0.05
    )


def default_workers() -> int:
    """Two single-threaded workers where there are two cores or more (see ``reproduce``)."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


# ---- parallel training: each worker process builds the (deterministic) data once ---------------
_WORKER: dict = {}


def _init_worker(preset_json: dict, queue, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    p = preset_from_json(preset_json)
    _WORKER["preset"] = p
    _WORKER["queue"] = queue
    _WORKER["bundle"] = build_bundle(
        p.n_images, p.n_eval, size=p.size, heterogeneity=p.heterogeneity, seed=p.data_seed,
        eval_sources=p.eval_sources,
    )  # fmt: skip


def _worker_run(model: str, construction: str, seed: int, run_dir: str) -> str:
    queue = _WORKER["queue"]
    pending = [0]

    def report(n: int) -> None:  # batch the messages: one per 10 steps
        pending[0] += n
        if pending[0] >= 10:
            queue.put(pending[0])
            pending[0] = 0

    train_run(
        _WORKER["bundle"], construction=construction, model=model, seed=seed, run_dir=run_dir,
        cfg=_WORKER["preset"].train, progress=report,
    )  # fmt: skip
    queue.put(pending[0])
    return run_dir


def _train_parallel(p: Preset, pending: list, n_workers: int, bar) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    with ProcessPoolExecutor(
        max_workers=n_workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(p.to_json(), queue, threads),
    ) as pool:
        futures = {pool.submit(_worker_run, m, c, s, str(d)): run_name(m, c, s) for (m, c, s), d in pending}
        left = set(futures)
        try:
            while left:
                done, left = wait(left, timeout=0.5, return_when=FIRST_COMPLETED)
                while not queue.empty():
                    bar.update(queue.get())
                for f in done:
                    f.result()  # re-raise a worker's error here
                    bar.set_postfix_str(f"finished {futures[f]}")
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        while not queue.empty():
            bar.update(queue.get())


def reproduce(
    out: str | Path,
    *,
    quick: bool = False,
    models: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    heterogeneity: float | None = None,
    progress: bool = True,
    preset: Preset | None = None,
    workers: int | None = None,
) -> Path:
    """Train every model x {IMAX, DMAX} x seed, evaluate, analyse and report into ``out``.

    Args:
        out: output folder (created; reused for resuming).
        quick: the quick preset (else the full one); ``preset`` overrides both.
        models, seeds, heterogeneity: override the preset's (None keeps them).
        progress: show a progress bar with ETA over all training steps.
        workers: runs trained at once, each in its own process with ``cores / workers`` torch
            threads (default ``default_workers()``: 2 on a machine with 2 or more cores, as tiny
            models use one core better than two).

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
    # The majority baseline of each part of the source split, on that part itself (as the scores).
    for part, idx in bundle.eval.source_split().items():
        baselines[f"majority_{part}"] = baseline_scores([bundle.eval.entries[i] for i in idx], "majority")
    (out / "baselines.json").write_text(json.dumps(baselines, indent=2) + "\n")

    plan = [(m, c, s) for m in p.models for s in p.seeds for c in CONSTRUCTIONS]
    run_dirs = [out / "runs" / run_name(*r) for r in plan]
    pending = [(r, d) for r, d in zip(plan, run_dirs, strict=True) if not (d / DONE_FILE).exists()]
    steps = p.train.steps(len(bundle.imax.entries))
    n_workers = max(1, min(workers if workers is not None else default_workers(), len(pending) or 1))
    if progress:
        print(
            f"{len(plan) - len(pending)} of {len(plan)} runs already done; training {len(pending)} ({n_workers} worker(s))"
        )
    for _, run_dir in pending:
        if run_dir.exists():  # an interrupted run: start it over rather than append to it
            shutil.rmtree(run_dir)
    bar = _progress_bar(steps * len(pending), progress)
    try:
        if n_workers == 1:
            for (model, construction, seed), run_dir in pending:
                bar.set_postfix_str(run_name(model, construction, seed))
                train_run(
                    bundle, construction=construction, model=model, seed=seed, run_dir=run_dir, cfg=p.train,
                    progress=bar.update,
                )  # fmt: skip
        else:
            _train_parallel(p, pending, n_workers, bar)
    finally:
        bar.close()
    train_s = time.perf_counter() - t0
    path = analyse(out, run_dirs, p, data, baselines, progress=progress)
    if progress:
        print(f"done in {time.perf_counter() - t0:.0f} s (training {train_s:.0f} s): {path}")
    return path


def analyse(
    out: Path, run_dirs: list[Path], preset: Preset, data: dict, baselines: dict, *, progress: bool = True
) -> Path:
    """Figures, results.md and report.pdf from the run stores in ``run_dirs``."""
    from dynamics import load_runs
    from dynamics.experiments.imax_dmax.figures import draw_all
    from dynamics.experiments.imax_dmax.results import run_scores, write_results
    from dynamics.report import build_report

    runset = load_runs([str(d) for d in run_dirs])
    per_run = run_scores(runset)
    figs = draw_all(runset, per_run, baselines, out / "figures")
    write_results(out, runset, preset.to_json(), data, baselines, [str(f.relative_to(out)) for f in figs])
    # The target is the stored overall score (the mean of the seven normalised task scores),
    # spelled as features() names it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_report(
            runset,  # already loaded: the report reads the same stores
            out / "report.pdf",
            by="construction",
            pair_on=["model", "seed"],
            primary=("fisher_se/all/mean", "fisher_rho/all/mean"),  # the paper's two hypotheses
            target="score/all/multitask_score",
            figures_dir=out / "figures" / "report",
            title=f"IMAX vs DMAX ({preset.name} preset)",
            progress=progress,
        )
    return out / "results.md"
