"""The ``dynamics`` command line (Typer).

Each command is a thin shell over a library function, imported inside the command so that
``dynamics --help`` stays fast.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="dynamics",
    help="Training-dynamics signals for multi-task models: inspect runs, import TensorBoard logs, "
    "build reports, and reproduce the IMAX-versus-DMAX comparison.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
reproduce_app = typer.Typer(help="End-to-end reproductions.", no_args_is_help=True)
app.add_typer(reproduce_app, name="reproduce")


# The library's errors name its parameters (by=, pair_on=, ...); on the command line they are flags.
_FLAGS = {
    "by": "--by",
    "pair_on": "--pair-on",
    "target": "--target",
    "out": "-o/--out",
    "primary": "--primary",
}


def _flags(message: str) -> str:
    """A library error with its parameter names (``by='x'``) replaced by the CLI's flags (``--by 'x'``)."""
    return re.sub(r"\b(" + "|".join(_FLAGS) + r")=", lambda m: _FLAGS[m.group(1)] + " ", message)


def _fail(err: Exception) -> typer.Exit:
    typer.secho(f"error: {_flags(str(err))}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _parse_tags(tags: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in tags or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"tag {item!r} is not KEY=VALUE (e.g. --tag construction=IMAX)")
        out[key] = value
    return out


@app.command("runs")
def runs_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Run directories, folders of runs, or globs.")],
) -> None:
    """A table of runs with their tags, steps, metrics and scores."""
    from rich.console import Console
    from rich.table import Table

    from dynamics.store.reader import load_runs

    try:
        rs = load_runs([str(p) for p in paths])
    except (FileNotFoundError, ValueError) as err:
        raise _fail(err) from err
    tags = rs.tag_columns
    table = Table(title=f"{len(rs.runs)} run(s)")
    for col in ["run", *tags, "steps", "tasks", "metrics", "scores"]:
        table.add_column(col, overflow="fold")
    names = rs.metrics.groupby("run_id")["name"].unique()
    n_scores = rs.scores.groupby("run_id").size()
    for _, run in rs.runs.iterrows():
        rid = run["run_id"]
        metric_names = sorted(names.get(rid, []))
        table.add_row(
            rid,
            *("" if _isna(run[t]) else str(run[t]) for t in tags),
            str(run["n_steps"]),
            ", ".join(run["tasks"]),
            ", ".join(metric_names),
            str(int(n_scores.get(rid, 0))),
        )
    Console().print(table)


def _isna(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value)


@app.command("import-tb")
def import_tb_cmd(
    logdir: Annotated[Path, typer.Argument(help="A TensorBoard log directory (searched recursively).")],
    out: Annotated[Path, typer.Argument(help="Where to write the run stores (one per event directory).")],
    tasks: Annotated[
        list[str] | None,
        typer.Option("--task", help="Declare a task name (repeatable); default: from dynamics/ tags."),
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="KEY=VALUE tag for every imported run (repeatable).")
    ] = None,
) -> None:
    """Import TensorBoard event files (e.g. an HF run with report_to="tensorboard") into run stores."""
    from dynamics.store.tensorboard import import_tensorboard

    try:
        written = import_tensorboard(logdir, out, tasks=tasks, tags=_parse_tags(tag), progress=True)
    except (FileNotFoundError, ValueError) as err:
        raise _fail(err) from err
    for path in written:
        typer.echo(str(path))


# ---- report commands (dynamics.report) -------------------------------------------------------

_BY_HELP = "Tag whose groups are compared (default: the only varying tag other than model / seed)."
_PAIR_HELP = "Comma-separated tags that pair runs across groups (default: model,seed where present)."
_TARGET_HELP = "Final score to explain: multitask_score or score/<task>/<metric>."
_PRIMARY_HELP = "Comma-separated pre-specified features tested with the target as their own Holm family."
_OLD = "Deprecated name of {}."


def _pick(new: str | None, old: str | None, new_flag: str, old_flag: str) -> str | None:
    if old is None:
        return new
    if new is not None:
        raise typer.BadParameter(f"pass {new_flag} only ({old_flag} is its deprecated name)")
    typer.secho(f"warning: {old_flag} is deprecated; use {new_flag}", fg=typer.colors.YELLOW, err=True)
    return old


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


@app.command("report")
def report_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Run directories, folders of runs, or globs.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="The PDF to write, e.g. report.pdf.")],
    by: Annotated[str | None, typer.Option("--by", help=_BY_HELP)] = None,
    pair_on: Annotated[str | None, typer.Option("--pair-on", help=_PAIR_HELP)] = None,
    target: Annotated[str, typer.Option("--target", help=_TARGET_HELP)] = "multitask_score",
    primary: Annotated[str | None, typer.Option("--primary", help=_PRIMARY_HELP)] = None,
    figures: Annotated[
        Path | None, typer.Option("--figures", help="Also write each page as PNG and SVG here.")
    ] = None,
    title: Annotated[str | None, typer.Option("--title", help="Headline of the first page.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
    group: Annotated[str | None, typer.Option("--group", hidden=True, help=_OLD.format("--by"))] = None,
    pair: Annotated[str | None, typer.Option("--pair", hidden=True, help=_OLD.format("--pair-on"))] = None,
) -> None:
    """A multi-page PDF: runs and key findings, curves, gradient geometry, Fisher spectrum, statistics."""
    from dynamics.report import build_report

    by = _pick(by, group, "--by", "--group")
    pair_on = _pick(pair_on, pair, "--pair-on", "--pair")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            result = build_report(
                [str(p) for p in paths], out, by=by, pair_on=pair_on, target=target, primary=_split(primary),
                figures_dir=figures, title=title, progress=progress,
            )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        raise _fail(err) from err
    typer.echo(f"wrote {result.path} ({result.n_pages} pages, {result.seconds:.1f} s)")
    for page, reason in result.skipped.items():
        typer.echo(f"  left out {page}: {_flags(reason)}")
    if result.figures:
        typer.echo(f"  {len(result.figures)} figure files in {figures}")


@app.command("summary")
def summary_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Run directories, folders of runs, or globs.")],
    by: Annotated[str | None, typer.Option("--by", help=_BY_HELP)] = None,
    pair_on: Annotated[str | None, typer.Option("--pair-on", help=_PAIR_HELP)] = None,
    target: Annotated[str, typer.Option("--target", help=_TARGET_HELP)] = "multitask_score",
    primary: Annotated[str | None, typer.Option("--primary", help=_PRIMARY_HELP)] = None,
    rows: Annotated[int, typer.Option("--rows", min=1, help="Rows per table.")] = 15,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
    group: Annotated[str | None, typer.Option("--group", hidden=True, help=_OLD.format("--by"))] = None,
    pair: Annotated[str | None, typer.Option("--pair", hidden=True, help=_OLD.format("--pair-on"))] = None,
) -> None:
    """The report's key tables and findings in the terminal."""
    from dynamics.report import print_summary

    by = _pick(by, group, "--by", "--group")
    pair_on = _pick(pair_on, pair, "--pair-on", "--pair")
    try:
        print_summary(
            [str(p) for p in paths], by=by, pair_on=pair_on, target=target, primary=_split(primary),
            max_rows=rows, progress=progress,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        raise _fail(err) from err


# ---- reproduce commands (dynamics.experiments) -----------------------------------------------


@reproduce_app.command("imax-dmax")
def reproduce_imax_dmax_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output folder (reused to resume an interrupted run).")],
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset", help="quick (smoke test), main (default, ~10 min on 2 cores) or full (~1.5 h)."
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="The smoke-test preset (same as --preset quick).")
    ] = False,
    arms: Annotated[
        str | None,
        typer.Option("--arms", help="Comma-separated arms: IMAX,DMAX,DMAX-mixed,DMAX-3stage (default: all)."),
    ] = None,
    finetune: Annotated[
        str | None,
        typer.Option(
            "--finetune", help="full or lora fine-tuning from the stage-0 checkpoint (default: full)."
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="Architecture to train (repeatable); default: the preset's."),
    ] = None,
    seed: Annotated[
        list[str] | None,
        typer.Option(
            "--seed",
            help="Seed replicate N or DATA:STYLE:INIT (repeatable); default: the preset's replicates.",
        ),
    ] = None,
    heterogeneity: Annotated[
        float | None,
        typer.Option(
            "--heterogeneity", min=0.0, max=1.0, help="Source shift h in [0, 1]; default: the preset's (1)."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Runs trained at once (default: 2 on 2+ cores).")
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar with ETA.")
    ] = True,
) -> None:
    """Reproduce IMAX versus DMAX on synthetic chest X-rays: stage 0, four arms, evaluation, report."""
    from dynamics.experiments.imax_dmax.pipeline import ReproductionRunning, reproduce

    if quick and preset not in (None, "quick"):
        raise _fail(ValueError(f"--quick and --preset {preset} contradict each other; give one"))
    try:
        path = reproduce(
            out,
            preset="quick" if quick else (preset or "main"),
            models=model,
            seeds=seed,
            arms=[a.strip() for a in arms.split(",") if a.strip()] if arms else None,
            finetune=finetune,
            heterogeneity=heterogeneity,
            progress=progress,
            workers=workers,
        )
    except (ValueError, ReproductionRunning) as err:
        raise _fail(err) from err
    typer.echo(str(path))


def main() -> None:  # pragma: no cover - console-script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
