"""Training curves of run folders: curves.png from results.jsonl and steps.jsonl.

`write_curves(run_dir)` draws one run (the trainer calls it at the end of training);
`python -m rankclip.plot RUN_DIR [RUN_DIR ...] [-o OUT.png]` draws one run or overlays several.
Figures are drawn on a bare Figure with the Agg canvas, never through pyplot, so using this
module does not change the caller's matplotlib backend and needs no display.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .errors import ReportError
from .files import atomic_file

Series = tuple[list[float], list[float]]
Curves = dict[str, dict[str, Series]]  # panel title -> line label -> (x ascending, y)

# Every figure has these panels, in this order: title -> x-axis label.
PANELS = {"training loss": "step", "learning rate": "step", "validation loss": "epoch", "zero-shot top-1": "epoch"}
# In an overlay the colour is the run and the line style the quantity.
LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
MARKER_MAX_POINTS = 50  # sparse series (per epoch, short runs) get markers, or a lone point would not show


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file, blank lines skipped; anything else is a ReportError."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReportError(f"{path} line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ReportError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_curves(run_dir: str | Path) -> Curves:
    """The series drawn for one run, every panel of PANELS present (empty when there is no data).

    Training loss and lr come from steps.jsonl, or, without it, from the per-epoch train
    records (plotted at their `step`, the step count at the epoch's end). A resumed run appends
    records for steps and epochs it had logged before; the later record wins, so each x appears
    once.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder")
    results_path, steps_path = run_dir / "results.jsonl", run_dir / "steps.jsonl"
    if not results_path.exists() and not steps_path.exists():
        raise ReportError(f"{run_dir} has neither results.jsonl nor steps.jsonl; give a run folder such as logs/<name>")
    results = read_jsonl(results_path) if results_path.exists() else []
    steps = read_jsonl(steps_path) if steps_path.exists() else []
    if not results and not steps:
        raise ReportError(f"{run_dir}: results.jsonl and steps.jsonl hold no records")

    points: dict[str, dict[str, dict[float, float]]] = {title: {} for title in PANELS}

    def add(title: str, label: str, x: object, y: object) -> None:
        if _is_number(x) and _is_number(y):
            points[title].setdefault(label, {})[x] = y

    for record in steps or [r for r in results if r.get("split") == "train"]:
        for key, value in record.items():
            if key.endswith("loss"):
                add("training loss", key, record.get("step"), value)
        add("learning rate", "lr", record.get("step"), record.get("lr"))
    for record in results:
        if record.get("split") == "validation":
            for key, value in record.items():
                if key.endswith("loss"):
                    add("validation loss", key, record.get("epoch"), value)
        elif record.get("split") == "eval":
            add("zero-shot top-1", str(record.get("eval_data_type", "zero-shot")), record.get("epoch"),
                record.get("zeroshot_top1"))
    return {title: {label: (sorted(xy), [xy[x] for x in sorted(xy)]) for label, xy in lines.items()}
            for title, lines in points.items()}


def run_label(run_dir: str | Path) -> str:
    """The run's folder name and, from its params.txt, its objective: 'exp1 (rankclip)'."""
    run_dir = Path(run_dir)
    name = run_dir.resolve().name
    params = run_dir / "params.txt"
    if params.is_file():
        for line in params.read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "loss" and value.strip():
                return f"{name} ({value.strip()})"
    return name


def new_figure(size: tuple[float, float]) -> Figure:
    """A bare Figure on the Agg canvas (never pyplot: the caller's backend stays as it was)."""
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def finish_panel(ax) -> None:
    """A legend for a panel with lines; a panel without any says 'no data'."""
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def draw_runs(runs: list[tuple[str, Curves]]) -> Figure:
    """One figure of the PANELS grid for (label, curves) pairs; several runs are overlaid."""
    fig = new_figure((12, 8))
    overlay = len(runs) > 1
    # A quantity (loss, contrastive_loss, ...) keeps its colour, or in an overlay its line style, in every panel.
    labels = list(dict.fromkeys(label for _, curves in runs for panel in curves.values() for label in panel))
    for ax, (title, xlabel) in zip(fig.subplots(2, 2).flat, PANELS.items()):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # steps and epochs are counts
        for run_index, (run_name, curves) in enumerate(runs):
            for label, (xs, ys) in curves[title].items():
                line_index = labels.index(label)
                style = ({"color": f"C{run_index % 10}", "linestyle": LINESTYLES[line_index % len(LINESTYLES)]}
                         if overlay else {"color": f"C{line_index % 10}"})
                ax.plot(xs, ys, label=f"{run_name}: {label}" if overlay else label, markersize=3,
                        marker="o" if len(xs) <= MARKER_MAX_POINTS else None, **style)
        finish_panel(ax)
    if not overlay:
        fig.suptitle(runs[0][0])
    return fig


def save_png(fig: Figure, out: Path) -> Path:
    """Write the figure to `out` through a temporary file in the same folder, so readers never see half a PNG."""
    try:
        with atomic_file(out) as f:
            fig.savefig(f, format="png")
    except OSError as e:  # name the PNG asked for, not the temporary file
        raise ReportError(f"cannot write {out}: {e.strerror or e}") from e
    return out


def write_plot(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Draw one run, or overlay several (one colour each), into the PNG `out`."""
    runs = [(run_label(run_dir), run_curves(run_dir)) for run_dir in run_dirs]
    return save_png(draw_runs(runs), Path(out))


def write_curves(run_dir: str | Path) -> Path:
    """Write `run_dir/curves.png` and return its path."""
    return write_plot([run_dir], Path(run_dir) / "curves.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rankclip.plot", description="Plot the training curves of run folders.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folder(s), e.g. logs/exp1")
    parser.add_argument("-o", "--output", type=Path, metavar="OUT.png",
                        help="PNG to write (default: RUN_DIR/curves.png for one run, ./comparison.png for several)")
    args = parser.parse_args(argv)
    default = args.run_dirs[0] / "curves.png" if len(args.run_dirs) == 1 else Path("comparison.png")
    try:
        path = write_plot(args.run_dirs, args.output or default)
    except (ReportError, OSError) as e:
        print(f"rankclip.plot: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
