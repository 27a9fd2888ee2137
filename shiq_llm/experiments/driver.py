"""The one driver of the LLM experiments (``shiq-llm experiment NAME --out DIR``): ``multiturn``, ``ablation`` and
``compare`` are configurations of it (:class:`Experiment`).

:func:`run` does what every experiment does — check the arguments, quiet the libraries, make ``DIR``, fix the CPU
threads, collect the long rows (the experiment's ``collect``: its sweeps, on the sweep machinery of
``shiq_llm.experiments.sweep``; a failed cell is reported and the others still written), then write

- ``DIR/NAME.csv``: the long rows (the experiment's ``first`` columns, then the others),
- ``DIR/NAME.png``: the experiment's ``plot``,
- ``DIR/NAME_table.md``: the experiment's ``tables`` (markdown; statistics of ``shiq_llm.experiments.report``),
- ``DIR/NAME_summary.json``: the arguments, the tables' data, the run times.

:func:`rederive` re-derives the figure and the table of an experiment from its CSV alone, without training
(``shiq-llm experiment NAME --tables-from DIR/NAME.csv --out OUT``: ``OUT/NAME.png`` and ``OUT/NAME_table.md``;
the reference of each task is the step-0 row every cell carries).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from shiq_toy.experiments import num_threads, write_summary

__all__ = ["Experiment", "Collected", "run", "rederive", "sweep_tasks", "read_rows", "references_of"]


@dataclass
class Collected:
    """What an experiment's ``collect`` returns: its long rows, the reference's evaluation per task (``None`` for
    a single-task experiment), the run times by stage, the extra summary entries and the first failure."""

    rows: list[dict]
    references: dict[Any, dict]
    seconds: dict[str, float]
    extra: dict
    failed: Exception | None = None


@dataclass(frozen=True)
class Experiment:
    """One experiment of the driver.

    ``check(args)`` raises ValueError naming a bad argument; ``collect(args, out) -> Collected`` trains and
    evaluates; ``tables(rows, references, args) -> {"markdown": str, …}``; ``plot(rows, references, args, path)``.
    ``first``: the leading columns of ``NAME.csv``; ``extra(tables, out)``, optional: further files from the
    tables (``compare``'s ``frontier.csv``)."""

    name: str
    first: tuple[str, ...]
    check: Callable
    collect: Callable
    tables: Callable
    plot: Callable
    extra: Callable | None = None


def run(experiment: Experiment, args) -> dict:
    """Run ``experiment`` with ``args`` (module docstring); returns the summary written to ``NAME_summary.json``.
    With ``args.tables_from`` set, :func:`rederive` instead."""
    from shiq_llm.experiments.demo import quiet_libraries

    if getattr(args, "tables_from", ""):
        return rederive(experiment, args, Path(args.tables_from))
    experiment.check(args)
    start = time.perf_counter()
    quiet_libraries()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with num_threads(args.threads):
        collected = experiment.collect(args, out)
    summary = _write(experiment, args, out, collected.rows, collected.references,
                     {**collected.extra, "seconds": time.perf_counter() - start, "seconds_by_stage": collected.seconds})
    if collected.failed is not None:
        raise collected.failed
    return summary


def rederive(experiment: Experiment, args, path: Path) -> dict:
    """The figure, the table and the summary of ``experiment`` from an existing ``NAME.csv`` at ``path``, written
    to ``args.out`` (no training)."""
    if not path.is_file():
        raise ValueError(f"--tables-from {path}: no such file")
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"--tables-from {path}: no rows")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return _write(experiment, args, out, rows, references_of(rows), {"rederived_from": str(path)}, csv_too=False,
                  summary_too=False)


def _write(experiment: Experiment, args, out: Path, rows, references, extra: dict, *, csv_too: bool = True,
           summary_too: bool = True) -> dict:
    name = experiment.name
    if csv_too:
        write_rows(rows, out / f"{name}.csv", first=experiment.first)
    tables = experiment.tables(rows, references, args)
    experiment.plot(rows, references, args, out / f"{name}.png")
    (out / f"{name}_table.md").write_text(tables["markdown"] + "\n")
    if experiment.extra is not None:
        experiment.extra(tables, out)
    print(tables["markdown"])
    written = [out / f"{name}.csv"] * csv_too + [out / f"{name}.png", out / f"{name}_table.md"]
    summary = {**tables, **extra}
    if summary_too:
        written.append(write_summary(out / f"{name}_summary.json", args, summary) and out / f"{name}_summary.json")
    print(", ".join(map(str, written)))
    return summary


def sweep_tasks(configs: Callable[[], Sequence[tuple[Any, Any]]], progress: bool) -> Collected:
    """Run one sweep per task (``configs()`` yields ``(task, SweepConfig)``, building each task's data when
    reached): the long rows of every cell (:func:`shiq_llm.experiments.sweep.curve_rows`, with a ``task``
    column unless the task is ``None``), the reference per task and the run time per task; a failed sweep's
    finished cells are kept and its error returned."""
    from shiq_llm.experiments.sweep import SweepError, curve_rows, run_sweep

    rows, references, seconds, cell_seconds, failed = [], {}, {}, {}, None
    tick = time.perf_counter()
    for task, config in configs():
        try:
            results = run_sweep(config, progress=progress)
        except SweepError as error:  # the finished cells are still reported; the failure is raised at the end
            results, failed = error.results, error
        references[task] = next(r for r in results if r["algo"] == "reference")
        rows += [({"task": task} if task is not None else {}) | r for r in curve_rows(results, config.out)]
        seconds[str(task)] = time.perf_counter() - tick
        cell_seconds[str(task)] = sum(r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in results)
        tick = time.perf_counter()
    return Collected(rows, references, seconds, {"cell_seconds": cell_seconds}, failed)


def write_rows(rows: Sequence[dict], path: Path, *, first: Sequence[str]) -> Path:
    """Long rows as CSV: the ``first`` columns, then every other key in order of first appearance (empty where a
    row lacks it or it is NaN / None)."""
    columns = list(dict.fromkeys([*first, *(k for row in rows for k in row)]))
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                             for k, v in row.items()})
    return Path(path)


#: Columns read back as text (all others are numbers; ``seed`` and ``step`` integers, ``selected`` a bool).
TEXT_COLUMNS = ("task", "method", "algo", "split")


def read_rows(path: Path) -> list[dict]:
    """Rows of a long CSV (:func:`write_rows`) back: empty cells left out, numbers as floats, ``seed`` and
    ``step`` as ints, ``selected`` as a bool, :data:`TEXT_COLUMNS` as text."""
    rows = []
    with Path(path).open(newline="") as f:
        for line, raw in enumerate(csv.DictReader(f), start=2):
            row = {}
            for k, v in raw.items():
                if v in ("", None):
                    continue
                if k in TEXT_COLUMNS:
                    row[k] = v
                elif k == "selected":
                    row[k] = v == "True"
                else:
                    try:
                        row[k] = int(float(v)) if k in ("seed", "step") else float(v)
                    except ValueError:
                        raise ValueError(f"{path}, line {line}, column {k}: not a number: {v!r}") from None
            rows.append(row)
    return rows


def references_of(rows: Sequence[dict]) -> dict:
    """The reference's evaluation per task (``None`` without a ``task`` column): the step-0 row of the first cell
    (every cell of a sweep carries the same one)."""
    references = {}
    for r in rows:
        if r.get("step") == 0 and r.get("method") != "reference":
            references.setdefault(r.get("task"), {k: v for k, v in r.items()
                                                  if k not in ("task", "method", "algo", "beta", "seed", "step")})
    return references
