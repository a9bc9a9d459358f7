"""Compare runs: AP curves, loss curves and a summary table from their log.jsonl files.

    python scripts/compare_runs.py runs/base runs/fine --out report/ [--reach 0.9] [--baseline NAME]
    python scripts/compare_runs.py runs/study --out runs/study/report     # a scripts/run_study.py folder

Each RUN_DIR is a main.py --output_dir. A folder with a study.json (scripts/run_study.py) stands
for its finished fine-tuning runs, grouped into its grid cells: the folds of a cell are aggregated,
curves as the mean over folds with a shaded band of +-1 standard deviation, numbers as mean +- std
(the sample standard deviation, n - 1; a single run has none). Writes into --out:

- ap_curves.png: val AP and AP50 at every evaluated epoch, one line per run or cell;
- loss_curves.png: train loss per epoch (solid) and val loss (dashed) where the log has it;
- summary.md: per run or cell, the final (last evaluated epoch) and the best (highest over the
  evaluated epochs, per fold) AP, AP50, AP75, APs, APm, APl (n/a where COCOeval had no object of
  that size), and the epochs it took to reach --reach (default 0.9) of the baseline's final AP: the
  first evaluated epoch whose AP (the mean over folds) is at least that, counted as epochs trained.

The baseline of a row is --baseline NAME (a run or cell) if given; otherwise the run or cell
trained without a pretext task and without --pretrain or --finetune (from its config.yaml) that
has the same label budget (--train_fraction, --shots), so that each label fraction of a study is
measured against its own baseline. A row without one shows '-'.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
FINISHED = ("done", "skipped")  # study.json statuses of runs that reached their last epoch


@dataclass
class RunLog:
    """One run's epochs (a later line for the same epoch wins: a restarted run) and its config."""

    name: str
    path: Path
    records: dict[int, dict]
    config: dict

    def series(self, key: str) -> dict[int, float]:
        """``key`` by epoch where logged; COCOeval's -1 (no object of that size) is left out."""
        return {epoch: float(r[key]) for epoch, r in sorted(self.records.items())
                if isinstance(r.get(key), (int, float)) and r[key] >= 0}


@dataclass
class Group:
    """A run, or a study cell of folds, as one line and one table row."""

    name: str
    runs: list[RunLog]

    @property
    def config(self) -> dict:
        return self.runs[0].config

    def curve(self, key: str) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(epochs logged by every fold, mean, std) of ``key``."""
        series = [run.series(key) for run in self.runs]
        epochs = sorted(set.intersection(*(set(s) for s in series)))
        values = np.array([[s[e] for e in epochs] for s in series]).reshape(len(series), len(epochs))
        return epochs, values.mean(axis=0), spread(values)

    def final(self, key: str) -> list[float]:
        """Each fold's value at its last epoch with ``key``."""
        return [s[max(s)] for s in (run.series(key) for run in self.runs) if s]

    def best(self, key: str) -> list[float]:
        return [max(s.values()) for s in (run.series(key) for run in self.runs) if s]

    @property
    def epochs(self) -> int:
        return max(max(run.records) + 1 for run in self.runs)


def spread(values: np.ndarray) -> np.ndarray:
    """Sample standard deviation over the first axis (0 for one row)."""
    return values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1:])


def read_log(run_dir: Path, name: str) -> RunLog:
    """A run folder's log.jsonl and config.yaml (empty when absent)."""
    log = run_dir / "log.jsonl"
    if not log.is_file():
        raise SystemExit(f"error: {run_dir}: no log.jsonl (not a main.py --output_dir, or no epoch finished yet)")
    records: dict[int, dict] = {}
    for number, line in enumerate(log.read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"error: {log}:{number}: not JSON: {err}") from None
            records[int(record["epoch"])] = record
    if not records:
        raise SystemExit(f"error: {log}: empty")
    config_file = run_dir / "config.yaml"
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    return RunLog(name, run_dir, records, config)


def study_groups(folder: Path, left_out: list[str]) -> list[Group]:
    """A study folder's finished fine-tunes by cell, in study.json order; others go to ``left_out``."""
    study = json.loads((folder / "study.json").read_text())
    cells: dict[str, list[RunLog]] = {}
    for run in study["runs"]:
        if run["kind"] != "finetune":
            continue
        if run["status"] not in FINISHED:
            left_out.append(f"{run['name']} ({run['status']})")
            continue
        run_dir = Path(run["output_dir"])
        run_dir = run_dir if run_dir.is_dir() else folder / run_dir.name  # a moved study folder
        cells.setdefault(run["cell"], []).append(read_log(run_dir, run["name"]))
    return [Group(cell, logs) for cell, logs in cells.items()]


def collect(paths: list[Path]) -> tuple[list[Group], list[str]]:
    """The groups to compare: a study folder's cells, or a run folder alone."""
    groups: list[Group] = []
    left_out: list[str] = []
    for path in paths:
        if (path / "study.json").is_file():
            groups += study_groups(path, left_out)
        else:
            groups.append(Group(path.name, [read_log(path, path.name)]))
    names = [group.name for group in groups]
    if len(set(names)) < len(names):
        raise SystemExit(f"error: two runs or cells share a name: {sorted({n for n in names if names.count(n) > 1})}")
    if not groups:
        raise SystemExit("error: nothing to compare (no finished fine-tuning run)")
    return groups, left_out


def is_plain(group: Group) -> bool:
    """Trained without a pretext task and without pre-trained or fine-tuned weights."""
    config = group.config
    return (bool(config) and config.get("ssl_task", "none") == "none" and config.get("ssl_method", "none") == "none"
            and not config.get("pretrain") and not config.get("finetune"))


def budget(group: Group) -> tuple:
    return group.config.get("train_fraction", 1.0), group.config.get("shots")


def baselines(groups: list[Group], name: str | None) -> dict[str, Group | None]:
    """Each group's baseline: ``name`` for all, or the plain group of the same label budget."""
    if name is not None:
        chosen = [g for g in groups if g.name == name]
        if not chosen:
            raise SystemExit(f"error: --baseline {name}: no such run or cell; there are: {[g.name for g in groups]}")
        return {g.name: chosen[0] for g in groups}
    plain = [g for g in groups if is_plain(g)]
    return {g.name: next((b for b in plain if budget(b) == budget(g)), None) for g in groups}


def epochs_to_reach(group: Group, target: float) -> int | None:
    """Epochs trained until the mean AP first reaches ``target`` (None: never)."""
    epochs, mean, _ = group.curve("val_AP")
    return next((epoch + 1 for epoch, value in zip(epochs, mean) if value >= target), None)


def mean_std(values: list[float]) -> str:
    """'0.412' for one value, '0.412 ± 0.013' for several (sample std), 'n/a' for none."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def reach_cell(group: Group, baseline: Group | None, reach: float) -> str:
    if baseline is None or not baseline.final("val_AP"):
        return "-"
    reference = float(np.mean(baseline.final("val_AP")))
    if reference <= 0:
        return "n/a (baseline AP 0)"
    epochs = epochs_to_reach(group, reach * reference)
    return "not reached" if epochs is None else str(epochs)


def summary_table(groups: list[Group], reach: float, baseline_of: dict[str, Group | None], left_out: list[str]) -> str:
    """summary.md: a table of final values and one of best values."""
    percent = f"{reach:.0%}"
    head = ["run", "folds", "epochs", *METRICS]
    lines = ["# Run comparison", "",
             f"{len(groups)} rows from {sum(len(g.runs) for g in groups)} runs. Several folds: mean ± sample standard "
             "deviation (n - 1) over folds. Final: the last evaluated epoch; best: each fold's highest over its "
             f"evaluated epochs. Epochs to reach: epochs trained until the mean AP first reached {percent} of the "
             "baseline's final AP.", "",
             "## Final", "",
             "| " + " | ".join([*head, "baseline", f"epochs to {percent} of baseline AP"]) + " |",
             "|" + "---|" * (len(head) + 2)]
    for g in groups:
        base = baseline_of[g.name]
        cells = [g.name, str(len(g.runs)), str(g.epochs), *(mean_std(g.final(f"val_{m}")) for m in METRICS),
                 base.name if base else "-", reach_cell(g, base, reach)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Best", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [g.name, str(len(g.runs)), str(g.epochs), *(mean_std(g.best(f"val_{m}")) for m in METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    if left_out:
        lines += ["", f"Not compared (not finished): {', '.join(left_out)}."]
    return "\n".join(lines) + "\n"


def plot_lines(axis: plt.Axes, group: Group, key: str, color, style: str = "-", label: str | None = None) -> None:
    """The group's mean of ``key`` per epoch, with the +-std band when it has several folds."""
    epochs, mean, std = group.curve(key)
    if not epochs:
        return
    trained = [epoch + 1 for epoch in epochs]  # the log's epochs count from 0
    axis.plot(trained, mean, style, color=color, marker="o" if len(epochs) < 30 else None, markersize=3, label=label)
    if len(group.runs) > 1:  # APs and losses are never negative: the band stops at 0
        axis.fill_between(trained, np.clip(mean - std, 0, None), mean + std, color=color, alpha=0.2, linewidth=0)


def colours(count: int) -> itertools.cycle:
    """One colour per line: tab10, or tab20 for more lines (repeating after 20)."""
    return itertools.cycle(plt.get_cmap("tab10" if count <= 10 else "tab20").colors)


def style_axis(axis: plt.Axes, ylabel: str, title: str) -> None:
    axis.set(xlabel="epochs trained", ylabel=ylabel, title=title)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    axis.grid(alpha=0.3)


def plot_ap(groups: list[Group], path: Path) -> None:
    """ap_curves.png: AP and AP50 per evaluated epoch."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for group, color in zip(groups, colours(len(groups))):
        label = group.name + (f" ({len(group.runs)} folds)" if len(group.runs) > 1 else "")
        for axis, key in zip(axes, ("AP", "AP50")):
            plot_lines(axis, group, f"val_{key}", color, label=label)
    for axis, key in zip(axes, ("AP", "AP50")):
        style_axis(axis, f"val {key}", f"val {key} (mean ± std over folds)")
    axes[0].legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_losses(groups: list[Group], path: Path) -> None:
    """loss_curves.png: train loss (solid) and val loss (dashed)."""
    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=100)
    for group, color in zip(groups, colours(len(groups))):
        plot_lines(axis, group, "train_loss", color, label=f"{group.name} train")
        plot_lines(axis, group, "val_loss", color, "--", label=f"{group.name} val")
    style_axis(axis, "loss", "loss (train solid, val dashed)")
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="main.py output folders or study folders")
    parser.add_argument("--out", required=True, type=Path, help="folder for ap_curves.png, loss_curves.png, summary.md")
    parser.add_argument("--reach", type=float, default=0.9,
                        help="fraction of the baseline's final AP whose epochs-to-reach the table gives (default 0.9)")
    parser.add_argument("--baseline", default=None, metavar="NAME",
                        help="the run or cell every row is measured against (default: see above)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.reach <= 1:
        raise SystemExit(f"error: --reach must be in (0, 1], got {args.reach}")
    groups, left_out = collect(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_ap(groups, args.out / "ap_curves.png")
    plot_losses(groups, args.out / "loss_curves.png")
    summary = summary_table(groups, args.reach, baselines(groups, args.baseline), left_out)
    (args.out / "summary.md").write_text(summary)
    print(summary, end="")
    print(f"wrote {args.out / 'ap_curves.png'}, {args.out / 'loss_curves.png'}, {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
