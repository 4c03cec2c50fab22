"""``dynamics reproduce imax-dmax``: stage 0, every arm's run, statistics, figures, report; resumable.

Layout of the output folder ``OUT``::

    .lock              held (flock) while a reproduction writes here; a second one refuses
    config.json        the preset (and its fingerprint, which a resumed run must match)
    data.json          per replicate: the builders' density statistics (IMAX, DMAX, DMAX-mixed, eval, probe)
    baselines.json     per replicate: majority and blind baselines on its evaluation set (and per source split)
    pretrained/<model>-st<style>-i<init>/   stage-0 checkpoints (model.pt; DONE when finished)
    runs/<model>-<arm>-d<data>-st<style>-i<init>/   one run store per run (DONE marks a finished one)
    results.md         tables read back from the run stores (see results.py)
    figures/           the pipeline's figures, and figures/report/ with the report's pages
    report.pdf         dynamics.report.build_report on all runs

A run or checkpoint whose folder has no ``DONE`` (interrupted) is deleted and redone; finished ones
are never redone, so rerunning the same command after a crash continues where it stopped, and
adding models, seeds or arms only trains the new runs.

Runs train in worker processes (``workers``, default 2 on 2+ cores), each run after its stage-0
checkpoint. Workers die with the pipeline (``workers.py``: ``prctl(PR_SET_PDEATHSIG)`` on Linux,
a watchdog thread elsewhere, armed before any heavy import), so a SIGKILL of ``dynamics
reproduce`` leaves no training processes behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing as mp
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, cast

from dynamics.experiments.imax_dmax.constructions import DataBundle, build_bundle
from dynamics.experiments.imax_dmax.metrics import baseline_scores
from dynamics.experiments.imax_dmax.presets import (
    FULL,
    MAIN,
    QUICK,
    Preset,
    Replicate,
    get_preset,
    replicate_label,
)
from dynamics.experiments.imax_dmax.pretrain import DONE_FILE as PRETRAIN_DONE
from dynamics.experiments.imax_dmax.pretrain import checkpoint_name, pretrain
from dynamics.experiments.imax_dmax.sources import SOURCE_SEED, make_sources
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES
from dynamics.experiments.imax_dmax.train import DONE_FILE, train_run
from dynamics.experiments.imax_dmax.workers import STATE, die_with_parent, init_worker

LOCK_FILE = ".lock"


class ReproductionRunning(RuntimeError):
    """Another reproduction holds ``OUT/.lock``."""


def run_name(model: str, arm: str, replicate: Replicate) -> str:
    return f"{model}-{arm}-{replicate_label(replicate)}"


# ---- one reproduction per output folder -----------------------------------------------------
class OutLock:
    """An exclusive ``flock`` on ``OUT/.lock``: the kernel releases it when the holder dies, even
    by SIGKILL, so a crashed run never leaves a stale lock; the file records the holder's pid."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> OutLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ReproductionRunning(
                    f"another `dynamics reproduce` (pid {holder}) is writing to {self.path.parent}; wait for it "
                    "to finish (or stop it), or use another --out folder"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def _check_config(out: Path, preset: Preset) -> None:
    cfg = out / "config.json"
    if cfg.exists():
        old = json.loads(cfg.read_text()).get("fingerprint")
        if old != preset.fingerprint():
            raise ValueError(
                f"{out} holds runs of a different configuration (fingerprint {old}, now "
                f"{preset.fingerprint()}): data, heterogeneity, stage 0 or training settings changed. "
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


def make_bundle(p: Preset, r: Replicate, verbose: bool = False) -> DataBundle:
    return build_bundle(
        p.n_images, p.n_eval, size=p.size, heterogeneity=p.heterogeneity, seed=r[0], style_seed=r[1],
        eval_sources=p.eval_sources, n_probe=p.n_probe, verbose=verbose,
    )  # fmt: skip


# ---- jobs: a stage-0 checkpoint or one run; the same functions in-process and in workers -------
_WORKER = STATE  # the worker's state (workers.py), also used in-process when workers=1


def _bundle(p: Preset, r: Replicate) -> DataBundle:
    cache = _WORKER.setdefault("bundles", {})
    key = (r[0], r[1])
    if key not in cache:
        cache.clear()  # one data draw at a time: the bundles of a full preset do not all fit twice
        cache[key] = make_bundle(p, r)
    return cache[key]


def _run_job(p: Preset, job: tuple, out: Path, progress: Callable[[int], None]) -> str:
    kind, model, arm, r = job
    if kind == "pretrain":
        sources = make_sources(len(TASK_NAMES), p.heterogeneity, style_seed=SOURCE_SEED + r[1])
        pretrain(
            model, sources=sources, size=p.size, dims=p.train.dims, cfg=p.pretrain, style_seed=r[1],
            init_seed=r[2], out_dir=out / "pretrained" / checkpoint_name(model, r[1], r[2]), progress=progress,
        )  # fmt: skip
        return f"stage 0 {model}"
    run_dir = out / "runs" / run_name(model, arm, r)
    if run_dir.exists():  # an interrupted run: start it over rather than append to it
        shutil.rmtree(run_dir)
    init = out / "pretrained" / checkpoint_name(model, r[1], r[2]) if p.pretrain.n_images > 0 else None
    train_run(
        _bundle(p, r), construction=arm, model=model, seed=r[2], run_dir=run_dir, cfg=p.train,
        progress=progress, init_from=init,
        tags={"seed": replicate_label(r), "data_seed": str(r[0]), "style_seed": str(r[1]), "init_seed": str(r[2])},
    )  # fmt: skip
    return run_name(model, arm, r)


def _worker_job(job: tuple, out: str) -> str:
    queue = _WORKER["queue"]
    pending = [0]

    def report(n: int) -> None:  # batch the messages: one per 10 steps
        pending[0] += n
        if pending[0] >= 10:
            queue.put(pending[0])
            pending[0] = 0

    name = _run_job(_WORKER["preset"], job, Path(out), report)
    queue.put(pending[0])
    return name


def _schedule(
    jobs: list[tuple], deps: dict[tuple, tuple | None], submit: Callable[[tuple], Future], on_tick
) -> None:
    """Submit every job once its dependency is done; re-raise the first error."""
    started: dict[Future, tuple] = {}
    done_jobs: set[tuple] = set()
    waiting = list(jobs)

    def release() -> None:
        for j in list(waiting):
            if deps.get(j) is None or deps[j] in done_jobs:
                waiting.remove(j)
                started[submit(j)] = j

    release()
    while started:
        finished, _ = wait(list(started), timeout=0.5, return_when=FIRST_COMPLETED)
        on_tick(None)
        for f in finished:
            job = started.pop(f)
            on_tick(f.result())  # re-raise a worker's error here
            done_jobs.add(job)
        release()


def _train_all(p: Preset, jobs: list[tuple], deps: dict, out: Path, n_workers: int, bar) -> None:
    if n_workers == 1:
        for job in jobs:  # pretraining jobs come first in the list
            bar.set_postfix_str(job[0] if job[0] == "pretrain" else run_name(job[1], job[2], job[3]))
            _WORKER.setdefault("bundles", {})
            _run_job(p, job, out, bar.update)
        return
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    with ProcessPoolExecutor(
        max_workers=n_workers,
        mp_context=ctx,
        initializer=init_worker,
        initargs=(p.to_json(), queue, threads, os.getpid()),
    ) as pool:

        def tick(name: str | None) -> None:
            while not queue.empty():
                bar.update(queue.get())
            if name:
                bar.set_postfix_str(f"finished {name}")

        try:
            _schedule(jobs, deps, lambda j: pool.submit(_worker_job, j, str(out)), tick)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        tick(None)


def reproduce(
    out: str | Path,
    *,
    quick: bool = False,
    preset: Preset | str | None = None,
    models: Sequence[str] | None = None,
    seeds: Sequence[str | int] | None = None,
    arms: Sequence[str] | None = None,
    finetune: str | None = None,
    heterogeneity: float | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Stage 0, every model x arm x replicate, evaluation, analysis and report into ``out``.

    Args:
        out: output folder (created; reused for resuming; locked while this runs).
        quick: the quick preset; ``preset`` (a ``Preset`` or a name: quick, main, full) overrides it;
            default: the main preset.
        models, seeds, arms, finetune, heterogeneity: override the preset's (None keeps them); a
            seed is ``N`` (data, style and init seed N) or ``DATA:STYLE:INIT``.
        progress: show a progress bar with ETA over all training steps (stage 0 and every arm).
        workers: runs trained at once, each in its own process with ``cores / workers`` torch
            threads (default ``default_workers()``: 2 on a machine with 2 or more cores, as tiny
            models use one core better than two).

    Returns:
        The path of ``results.md``.

    Raises:
        ReproductionRunning: another reproduction is writing to ``out``.
    """
    base = get_preset(preset) if isinstance(preset, str) else preset
    base = base if base is not None else (QUICK if quick else MAIN)
    p = base.with_overrides(
        models=models, seeds=seeds, arms=arms, finetune=finetune, heterogeneity=heterogeneity
    )
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    with OutLock(out):
        return _reproduce_locked(out, p, progress=progress, workers=workers)


def _reproduce_locked(out: Path, p: Preset, *, progress: bool, workers: int | None) -> Path:
    _check_config(out, p)
    t0 = time.perf_counter()
    data: dict[str, Any] = {}
    baselines: dict[str, Any] = {}
    for r in p.replicates:
        bundle = make_bundle(p, r, verbose=progress)
        label = replicate_label(r)
        data[label] = {
            c.name: c.stats()
            for c in (bundle.imax, bundle.dmax, bundle.dmax_mixed, bundle.eval, bundle.probe)
            if c
        }
        base = {k: baseline_scores(bundle.eval.entries, k) for k in ("majority", "blind")}
        # The majority baseline of each part of the source split, on that part itself (as the scores).
        for part, idx in bundle.eval.source_split().items():
            base[f"majority_{part}"] = baseline_scores([bundle.eval.entries[i] for i in idx], "majority")
        baselines[label] = base
        n_entries = len(bundle.imax.entries)
    (out / "data.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "baselines.json").write_text(json.dumps(baselines, indent=2) + "\n")

    plan = [(m, a, r) for m in p.models for r in p.replicates for a in p.arms]
    run_dirs = [out / "runs" / run_name(*x) for x in plan]
    pending = [
        ("run", m, a, r) for (m, a, r), d in zip(plan, run_dirs, strict=True) if not (d / DONE_FILE).exists()
    ]
    deps: dict[tuple, tuple | None] = {}
    pre_jobs: list[tuple] = []
    if p.pretrain.n_images > 0:
        for job in pending:
            _, m, _, r = job
            pre = ("pretrain", m, "", (0, r[1], r[2]))  # a checkpoint does not depend on the data seed
            deps[job] = pre
            if (
                pre not in pre_jobs
                and not (out / "pretrained" / checkpoint_name(m, r[1], r[2]) / PRETRAIN_DONE).exists()
            ):
                pre_jobs.append(pre)
    jobs = pre_jobs + pending
    for j in pending:
        if deps.get(j) not in pre_jobs:
            deps[j] = None
    steps = p.train.steps(n_entries)
    total = steps * len(pending) + p.pretrain.steps() * len(pre_jobs)
    n_workers = max(1, min(workers if workers is not None else default_workers(), len(jobs) or 1))
    if progress:
        print(
            f"{len(plan) - len(pending)} of {len(plan)} runs already done; training {len(pre_jobs)} stage-0 "
            f"checkpoint(s) and {len(pending)} run(s) ({n_workers} worker(s))"
        )
    bar = _progress_bar(total, progress)
    try:
        _train_all(p, jobs, deps, out, n_workers, bar)
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
            cast(Any, runset),  # already loaded: the report reads the same stores
            out / "report.pdf",
            by="construction",
            pair_on=["model", "seed"],
            primary=("fisher_se/all/mean", "fisher_rho/all/mean"),  # the paper's two hypotheses
            target="score/all/multitask_score",
            figures_dir=out / "figures" / "report",
            title=f"IMAX vs DMAX arms ({preset.name} preset)",
            progress=progress,
        )
    return out / "results.md"


__all__ = [
    "reproduce",
    "analyse",
    "run_name",
    "OutLock",
    "ReproductionRunning",
    "die_with_parent",
    "FULL",
    "MAIN",
]
