"""A comparison report over run folders: report.md, report.png and report.json.

`python -m rankclip.report STUDY_OR_RUNS... [-o DIR] [--at final|best] [--allow_mixed]`

Runs are grouped into configurations by their stored settings (params.txt) with the seed and
the settings that only say how or where a run ran left out; each metric is reported as the
mean ± sample standard deviation (ddof=1) over a configuration's seeds. Runs on different
data, models or evaluation sets are refused unless --allow_mixed is given.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .errors import RankCLIPError, ReportError
from .files import atomic_write_text
from .plot import finish_panel, new_figure, read_jsonl, run_curves, save_png
from .weights import read_checkpoint

# Settings that say how or where a run ran (or are derived from others), not what it computes:
# among them how it saved, logged and resumed, which a requeued run may change.
EXECUTION_SETTINGS = frozenset({
    "name", "logs", "config", "resume", "demo", "num_workers", "device", "device_id", "device_ids", "distributed",
    "distributed_backend", "distributed_init_method", "wandb", "notes",
    "save_every_minutes", "save_every_steps", "keep_checkpoints", "log_every_n_steps", "best_metric",
    "resume_allow_changes",
})
# Runs that differ in one of these did not learn from, or were not measured on, the same thing.
MIXED_SETTINGS = ("train_data", "dataset_type", "train_num_samples", "validation_data", "delimiter", "image_key",
                  "caption_key", "model_name", "eval_data_type", "eval_test_data_dir", "eval_train_data_dir",
                  "linear_probe", "linear_probe_batch_size", "linear_probe_num_epochs", "retrieval_data")
HIGHER, LOWER, NEITHER = "higher", "lower", None


@dataclass(frozen=True)
class Family:
    """One table: records of `split` (one column group per value of `set_key`, if any) and their metrics."""

    title: str
    split: str
    set_key: Optional[str]
    metrics: tuple[tuple[str, str, Optional[str]], ...]  # (results key, column name, which value is best)


FAMILIES = (
    Family("Zero-shot accuracy", "eval", "eval_data_type",
           (("zeroshot_top1", "top-1", HIGHER), ("zeroshot_top5", "top-5", HIGHER))),
    Family("Linear probe accuracy", "eval", "eval_data_type",
           (("linear_probe_top1", "top-1", HIGHER), ("linear_probe_top5", "top-5", HIGHER))),
    Family("Retrieval recall", "retrieval", "retrieval_data",
           tuple((f"{way}_R@{k}", f"{way.replace('_to_', '→')} R@{k}", HIGHER)
                 for way in ("image_to_text", "text_to_image") for k in (1, 5, 10))),
    Family("Ranking consistency (validation)", "validation", None,
           (("inmodal_consistency", "in-modal", HIGHER), ("crossmodal_consistency", "cross-modal", HIGHER))),
    Family("Alignment and uniformity (validation)", "validation", None,
           (("alignment", "alignment", LOWER), ("image_uniformity", "image uniformity", LOWER),
            ("text_uniformity", "text uniformity", LOWER))),
    Family("Modality gap (validation)", "validation", None, (("modality_gap", "modality gap", NEITHER),)),
    Family("Validation contrastive loss", "validation", None, (("contrastive_loss", "contrastive loss", LOWER),)),
)
CURVE_PANELS = ("zero-shot top-1", "validation loss")  # plot.run_curves panels drawn, the latter's contrastive_loss
STD_NOTE = "sample standard deviation (ddof=1) over seeds"


def read_params(run_dir: Path) -> dict[str, str]:
    """params.txt (`key: value` lines, as RunLogger writes them) as strings."""
    settings = {}
    for line in (run_dir / "params.txt").read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            settings[key.strip()] = value.strip()
    return settings


def latest_records(results: list[dict]) -> dict[tuple, dict]:
    """(epoch, split, set) -> record; a resumed run re-logs epochs, and the later record wins."""
    return {(r.get("epoch"), r.get("split"), r.get("eval_data_type", r.get("retrieval_data"))): r for r in results}


def final_epoch(settings: dict[str, str], epochs_logged: set[int]) -> int:
    """The epoch a run ends at: its --epochs, or for an evaluation-only run the epoch it evaluated."""
    if settings.get("train_data", "None") == "None":
        return max(epochs_logged, default=0)
    return int(settings["epochs"])


@dataclass(frozen=True)
class Run:
    """One finished run folder: its stored settings, its results records by (epoch, split, set) and the epoch reported."""

    path: Path
    settings: dict[str, str]
    records: dict[tuple, dict]
    epoch: int  # the epoch the report's values are taken at

    @property
    def configuration(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((k, v) for k, v in self.settings.items() if k not in EXECUTION_SETTINGS | {"seed"}))

    def values(self, family: Family) -> dict[str, tuple[float, Optional[str]]]:
        """Column -> (value at the report's epoch, which value is best)."""
        columns = {}
        for (epoch, split, set_name), record in self.records.items():
            if epoch != self.epoch or split != family.split:
                continue
            for key, column, direction in family.metrics:
                value = record.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    columns[f"{set_name} {column}" if family.set_key else column] = (float(value), direction)
        return columns


def load_run(path: Path, at: str) -> Run:
    """A run folder whose results reach its final epoch; ReportError saying why a folder is left out."""
    if not (path / "params.txt").is_file():
        raise ReportError("no params.txt: not a run folder")
    if not (path / "results.jsonl").is_file():
        raise ReportError("no results.jsonl yet")
    settings = read_params(path)
    records = latest_records(read_jsonl(path / "results.jsonl"))
    epochs_logged = {epoch for epoch, _, _ in records if isinstance(epoch, int)}
    final = final_epoch(settings, epochs_logged)
    if final not in epochs_logged:
        raise ReportError(f"unfinished: results reach epoch {max(epochs_logged, default=0)} of {final}")
    epoch = final
    if at == "best":
        best = path / "checkpoints" / "epoch.best.pt"
        if not best.is_file():
            metric = settings.get("best_metric", "contrastive_loss")
            raise ReportError(f"no {best.relative_to(path)} (written at each epoch that improves --best_metric "
                              f"{metric}; this run recorded no such epoch)")
        epoch = int(read_checkpoint(best)["epoch"])  # memory-mapped: no tensor is read
        if epoch not in epochs_logged:
            raise ReportError(f"results.jsonl has no records for epoch {epoch}, the epoch of epoch.best.pt")
    return Run(path, settings, records, epoch)


def is_run_folder(path: Path) -> bool:
    return (path / "params.txt").is_file() or (path / "results.jsonl").is_file()


def find_run_folders(paths: Sequence[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Run folders named directly or found one level below a study folder; (folders, [(path, why left out)])."""
    folders, missing = [], []
    for path in paths:
        if is_run_folder(path):
            folders.append(path)
        elif path.is_dir() and (children := sorted(p for p in path.iterdir() if p.is_dir() and is_run_folder(p))):
            folders.extend(children)
        else:
            missing.append((str(path), "no such folder" if not path.exists() else "no run folders in it"))
    unique = {p.resolve(): p for p in reversed(folders)}  # a folder given twice counts once
    return list(reversed(unique.values())), missing


@dataclass
class Configuration:
    """Runs that differ only in their seed (and how they ran)."""

    settings: tuple[tuple[str, str], ...]
    runs: list[Run] = field(default_factory=list)
    label: str = ""


def group_runs(runs: list[Run]) -> tuple[list[Configuration], list[tuple[str, str]]]:
    """Configurations in first-seen order; a second run with the same settings and seed is left out."""
    groups: dict[tuple, Configuration] = {}
    left_out = []
    for run in runs:
        group = groups.setdefault(run.configuration, Configuration(run.configuration))
        twin = next((r for r in group.runs if r.settings.get("seed") == run.settings.get("seed")), None)
        if twin is not None:
            left_out.append((str(run.path), f"same settings and seed as {twin.path}: not another seed"))
        else:
            group.runs.append(run)
    return list(groups.values()), left_out


def differing_settings(configurations: list[Configuration]) -> list[str]:
    """The setting keys whose values are not the same in every configuration."""
    tables = [dict(c.settings) for c in configurations]
    keys = sorted(set().union(*tables)) if tables else []
    return [k for k in keys if len({t.get(k) for t in tables}) > 1]


def check_not_mixed(runs: list[Run]) -> None:
    """Refuse runs trained or evaluated on different data, models or evaluation sets."""
    differences = []
    for key in MIXED_SETTINGS:
        seen: dict[str, Path] = {}
        for run in runs:
            seen.setdefault(run.settings.get(key, "None"), run.path)
        if len(seen) > 1:
            differences.append(f"{key} (" + "; ".join(f"{v} in {p}" for v, p in seen.items()) + ")")
    if differences:
        raise ReportError("the runs differ in data, model or evaluation settings: " + ", ".join(differences)
                          + "; pass --allow_mixed to report them together anyway")


def summarize(values: list[float]) -> dict:
    """Mean, sample standard deviation (ddof=1; None for one seed) and count."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def family_tables(configurations: list[Configuration]) -> dict[str, dict]:
    """Family title -> {"rows": label -> column -> summary, "best": column -> best labels}; empty families omitted.

    The best mean per column is the highest or lowest as the metric says (ties share it); columns
    whose metric has no better direction have no entry in "best".
    """
    tables = {}
    for family in FAMILIES:
        rows: dict[str, dict[str, dict]] = {}
        directions: dict[str, Optional[str]] = {}
        for configuration in configurations:
            per_column: dict[str, list[float]] = {}
            for run in configuration.runs:
                for column, (value, direction) in run.values(family).items():
                    per_column.setdefault(column, []).append(value)
                    directions[column] = direction
            rows[configuration.label] = {column: summarize(values) for column, values in per_column.items()}
        if not directions:
            continue
        best = {}
        for column, direction in directions.items():
            means = {label: row[column]["mean"] for label, row in rows.items()
                     if column in row and math.isfinite(row[column]["mean"])}
            if direction is not NEITHER and means:
                target = (max if direction == HIGHER else min)(means.values())
                best[column] = [label for label, mean in means.items() if mean == target]
        tables[family.title] = {"columns": list(directions), "rows": rows, "best": best}
    return tables


def label_configurations(configurations: list[Configuration], keys: list[str]) -> None:
    """Name each configuration by its differing settings: 'loss=clip, lambda1=0'."""
    for configuration in configurations:
        settings = dict(configuration.settings)
        shown = keys or ["loss"]
        configuration.label = ", ".join(f"{k}={settings.get(k, '—')}" for k in shown)


def seed_curves(runs: list[Run]) -> dict[str, dict]:
    """Curve title -> {epochs, mean, std} over the runs (only the epochs every run logged)."""
    per_run = [run_curves(run.path) for run in runs]
    lines: dict[str, list[dict[float, float]]] = {}
    for curves in per_run:
        for label, (xs, ys) in curves["zero-shot top-1"].items():
            lines.setdefault(f"zero-shot top-1 {label}", []).append(dict(zip(xs, ys)))
        xs, ys = curves["validation loss"].get("contrastive_loss", ([], []))
        lines.setdefault("validation contrastive loss", []).append(dict(zip(xs, ys)))
    summary = {}
    for title, series in lines.items():
        if len(series) != len(runs):
            continue
        epochs = sorted(set.intersection(*(set(s) for s in series)))
        if not epochs:
            continue
        stats = [summarize([s[e] for s in series]) for e in epochs]
        summary[title] = {"epochs": epochs, "mean": [s["mean"] for s in stats], "std": [s["std"] for s in stats],
                          "seeds": len(series)}
    return summary


def draw_curves(curves: dict[str, dict[str, dict]]) -> Figure:
    """One panel per curve title, one line per configuration, shaded mean ± std over seeds."""
    titles = list(dict.fromkeys(title for per_title in curves.values() for title in per_title))
    fig = new_figure((6 * max(1, len(titles)), 4.5))
    axes = fig.subplots(1, max(1, len(titles)), squeeze=False).flat
    for ax, title in zip(axes, titles or ["no curves"]):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        for index, (label, per_title) in enumerate(curves.items()):
            if title not in per_title:
                continue
            line = per_title[title]
            colour = f"C{index % 10}"
            seeds = line["seeds"]
            ax.plot(line["epochs"], line["mean"], color=colour, marker="o", markersize=3,
                    label=f"{label} ({seeds} seed{'s' if seeds > 1 else ''})")
            if all(s is not None for s in line["std"]):
                ax.fill_between(line["epochs"], [m - s for m, s in zip(line["mean"], line["std"])],
                                [m + s for m, s in zip(line["mean"], line["std"])], color=colour, alpha=0.2)
        finish_panel(ax)
    fig.suptitle(f"mean over seeds, band: ± {STD_NOTE}")
    return fig


def format_summary(summary: dict) -> str:
    if summary["std"] is None:
        return f"{summary['mean']:.4f}"
    return f"{summary['mean']:.4f} ± {summary['std']:.4f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def epochs_text(configuration: Configuration) -> str:
    return ", ".join(str(e) for e in sorted({run.epoch for run in configuration.runs}))


def render_markdown(report: dict, configurations: list[Configuration]) -> str:
    at = "the final epoch" if report["at"] == "final" else "the epoch of each run's checkpoints/epoch.best.pt"
    lines = [f"# Comparison of {len(configurations)} configurations ({sum(len(c.runs) for c in configurations)} runs)",
             "", f"Each cell: mean ± {STD_NOTE} (one seed: the value alone); values taken at {at} "
             "(column `epoch`). Best per column in bold: highest accuracy, recall and consistency; lowest "
             "alignment, uniformity and loss; the modality gap has no better direction and is not marked.", ""]
    by_label = {c.label: c for c in configurations}
    for family in FAMILIES:
        table = report["tables"].get(family.title)
        if table is None:
            continue
        rows, columns, best = table["rows"], table["columns"], table["best"]
        body = []
        for label, row in rows.items():
            cells = []
            for column in columns:
                text = format_summary(row[column]) if column in row else "—"
                cells.append(f"**{text}**" if label in best.get(column, []) else text)
            body.append([label, str(len(by_label[label].runs)), epochs_text(by_label[label]), *cells])
        lines += [f"## {family.title}", "", *markdown_table(["configuration", "seeds", "epoch", *columns], body), ""]
    keys = report["differing_settings"]
    lines += ["## Settings that differ", ""]
    if keys:
        body = [[c.label, *(dict(c.settings).get(k, "—") for k in keys),
                 ", ".join(r.settings.get("seed", "?") for r in c.runs), ", ".join(r.path.name for r in c.runs)]
                for c in configurations]
        lines += markdown_table(["configuration", *keys, "seeds", "runs"], body)
    else:
        lines.append("All runs share every setting but the seed: "
                     + ", ".join(f"{r.path} (seed {r.settings.get('seed')})" for c in configurations for r in c.runs))
    lines.append("")
    if report["left_out"]:
        lines += ["## Left out", "", *(f"- {item['run']}: {item['reason']}" for item in report["left_out"]), ""]
    lines += ["![curves](report.png)", ""]
    return "\n".join(lines)


def build_report(paths: Sequence[str | Path], at: str = "final", allow_mixed: bool = False,
                 warn=lambda message: print(f"rankclip.report: warning: {message}", file=sys.stderr)
                 ) -> tuple[dict, list[Configuration]]:
    """The report's numbers (report.json's content) and its configurations."""
    folders, left_out = find_run_folders([Path(p) for p in paths])
    runs = []
    for folder in folders:
        try:
            runs.append(load_run(folder, at))
        except ReportError as e:
            left_out.append((str(folder), str(e)))
    if not allow_mixed:
        check_not_mixed(runs)
    configurations, twins = group_runs(runs)
    left_out += twins
    for path, reason in left_out:
        warn(f"{path} left out: {reason}")
    if not configurations:
        raise ReportError("no finished runs to report on; give run folders or a study folder such as logs/<study>")
    keys = differing_settings(configurations)
    label_configurations(configurations, keys)
    report = {
        "at": at,
        "std": STD_NOTE,
        "configurations": [{"label": c.label, "settings": {k: dict(c.settings).get(k) for k in keys},
                            "runs": [str(r.path) for r in c.runs], "seeds": [r.settings.get("seed") for r in c.runs],
                            "epochs": [r.epoch for r in c.runs]} for c in configurations],
        "differing_settings": keys,
        "tables": family_tables(configurations),
        "curves": {c.label: seed_curves(c.runs) for c in configurations},
        "left_out": [{"run": path, "reason": reason} for path, reason in left_out],
    }
    return report, configurations


def write_report(paths: Sequence[str | Path], out_dir: str | Path, at: str = "final",
                 allow_mixed: bool = False) -> list[Path]:
    """Write report.md, report.json and report.png into `out_dir`; returns their paths."""
    report, configurations = build_report(paths, at, allow_mixed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.md", out_dir / "report.json", out_dir / "report.png"]
    atomic_write_text(written[0], render_markdown(report, configurations))
    atomic_write_text(written[1], json.dumps(report, indent=2) + "\n")
    save_png(draw_curves(report["curves"]), written[2])
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rankclip.report",
                                     description="Compare runs: tables (mean ± std over seeds) and curves.")
    parser.add_argument("paths", nargs="+", metavar="STUDY_OR_RUN",
                        help="run folders (logs/<name>) or study folders holding them (logs/<study>)")
    parser.add_argument("-o", "--output_dir", help="where report.md/.json/.png go (default: the study folder when "
                        "one study is given, else the current folder)")
    parser.add_argument("--at", choices=("final", "best"), default="final",
                        help="take each run's values at its final epoch or at the epoch of checkpoints/epoch.best.pt")
    parser.add_argument("--allow_mixed", action="store_true",
                        help="report runs with different data, models or evaluation sets together")
    args = parser.parse_args(argv)
    single_study = len(args.paths) == 1 and Path(args.paths[0]).is_dir() and not is_run_folder(Path(args.paths[0]))
    out_dir = args.output_dir or (args.paths[0] if single_study else ".")
    try:
        for path in write_report(args.paths, out_dir, args.at, args.allow_mixed):
            print(path)
    except (RankCLIPError, OSError) as e:
        print(f"rankclip.report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
