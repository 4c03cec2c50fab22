"""The ``dynamics`` command line (Typer).

Each command is a thin shell over a library function, imported inside the command so that
``dynamics --help`` stays fast.
"""

from __future__ import annotations

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


def _fail(err: Exception) -> typer.Exit:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
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
    out_dir: Annotated[Path, typer.Argument(help="Where to write the run stores (one per event directory).")],
    tasks: Annotated[
        list[str] | None, typer.Option("--task", help="Declare a task name (repeatable); default: from dynamics/ tags.")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="KEY=VALUE tag for every imported run (repeatable).")] = None,
) -> None:
    """Import TensorBoard event files (e.g. an HF run with report_to="tensorboard") into run stores."""
    from dynamics.store.tensorboard import import_tensorboard

    try:
        written = import_tensorboard(logdir, out_dir, tasks=tasks, tags=_parse_tags(tag), progress=True)
    except (FileNotFoundError, ValueError) as err:
        raise _fail(err) from err
    for path in written:
        typer.echo(str(path))


# ---- report commands (dynamics.report) -------------------------------------------------------


# ---- reproduce commands (dynamics.experiments) -----------------------------------------------


def main() -> None:  # pragma: no cover - console-script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
