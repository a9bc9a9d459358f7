"""Run a study: a grid of main.py runs times label-budget folds, one after another, resumable.

    python scripts/run_study.py --config BASE.yaml --grid 'ssl_task=none,mim_continuous' \\
        --grid 'train_fraction=0.01,0.1' --folds 3 --out runs/study [--pretrain_config PRE.yaml] \\
        [--launcher python|torchrun|sbatch] [--launcher_args '...'] [--dry_run] [-- extra main.py flags]
    python scripts/compare_runs.py runs/study --out runs/study/report     # then compare them

Runs. The grid is the cartesian product of the --grid values (KEY=V1,V2,...; KEY is a main.py flag
name, as in YAML; true/false for on/off flags). Every cell runs once per fold, fold f adding
``--fraction_seed f``: another seeded choice of the labelled images. A cell without a label budget
(no --train_fraction below 1, no --shots, from its config, extra flags or grid) runs fold 0 only,
since every seed chooses all images. A run is ``main.py --config BASE.yaml [extra flags] --KEY VALUE
... --fraction_seed F --output_dir OUT/NAME`` (the grid's values win over the extra flags); NAME joins
the grid values and the fold, e.g. ``ssl_task-mim_continuous__train_fraction-0.1__fold-0``.

Pre-training. With --pretrain_config PRE.yaml (BASE must then be a fine-tuning config, not
--ssl_mode pretrain), the grid's pretext keys (the ssl_* flags, --tokenizer and the methods' own
flags such as --num_patches) describe a pre-training instead of the fine-tune. A cell whose
pre-training names a task (--ssl_task or --ssl_method not none, after PRE.yaml and the grid) needs
the run ``main.py --config PRE.yaml [extra flags] --KEY VALUE ... --output_dir
OUT/pretrain__ssl_task-mim_continuous``: one per distinct setting of the pretext keys, shared by
every cell and fold with that setting, and run before them (the extra flags less --train_fraction
and --shots: label budgets are the fine-tunes' business). Its fine-tunes run BASE with the grid's
other keys and ``--pretrain OUT/pretrain__.../checkpoint.pth``. A cell with --ssl_task none and no
method is the baseline: no pre-training, no --pretrain. Without --pretrain_config the pretext keys
go to the run itself, which then trains the task next to detection (BASE's --ssl_mode).

Resuming. A run whose log.jsonl holds its last epoch (--epochs of its saved config.yaml) is
finished and skipped; an unfinished one with an OUT/NAME/checkpoint.pth continues with --resume
(in place of --pretrain, which main.py refuses next to it). A failed run does not stop the study,
but the fine-tunes of a failed pre-training are not started (failed too). Ctrl-C stops the study
once the run in progress has saved its checkpoint; calling the script again resumes it. OUT/study.json
lists every run (name, kind, cell, grid values, fold, command, status, output dir) and is rewritten
after each run; status is pending, done, failed, or skipped (found finished before this call).
--dry_run prints the command lines (and writes study.json) without running anything.

Launchers: python runs ``sys.executable main.py ...``; torchrun ``torchrun [--launcher_args] main.py
...``; sbatch ``sbatch --wait --job-name NAME --output OUT/NAME/slurm-%j.out [--launcher_args] --wrap
'python main.py ...'``, where --wait makes each job end before the next starts, so the order (and
the pre-trainings' checkpoints) hold as with the other two.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detr_ssl.config import build_parser as build_main_parser  # noqa: E402
from detr_ssl.config import load_yaml_config  # noqa: E402
from detr_ssl.methods import add_method_arguments  # noqa: E402

MAIN = REPO / "main.py"
STUDY_FILE = "study.json"
LAUNCHERS = ("python", "torchrun", "sbatch")
MANAGED = ("config", "output_dir", "resume", "pretrain", "fraction_seed")  # flags the study sets itself
BUDGET_FLAGS = ("--train_fraction", "--shots")  # extra flags that pre-trainings do not get
INTERRUPTED = (130, -2)  # main.py's exit code after Ctrl-C, or killed by SIGINT


@dataclass
class Run:
    """One main.py run of the study, as study.json records it."""

    name: str
    kind: str  # "pretrain" or "finetune"
    cell: str  # the grid cell: the name without the fold
    grid: dict[str, str]
    fold: int | None
    output_dir: str
    flags: list[str]  # main.py flags, without --output_dir, --pretrain and --resume
    pretrain: str | None = None  # name of the pre-training run it starts from
    command: list[str] = field(default_factory=list)
    status: str = "pending"
    error: str | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s --config BASE.yaml --grid KEY=V1,V2 ... --out DIR [options] "
                                           "[-- main.py flags]")
    add = parser.add_argument
    add("--config", required=True, help="main.py YAML config every (fine-tuning) run starts from")
    add("--grid", action="append", default=[], metavar="KEY=V1,V2",
        help="a main.py flag and its values; repeat for more keys (cartesian product)")
    add("--folds", type=int, default=1, help="label-budget folds: --fraction_seed 0..FOLDS-1 (default: 1)")
    add("--out", required=True, help="study folder: one sub-folder per run, and study.json")
    add("--pretrain_config", default=None, metavar="PRE.yaml",
        help="main.py YAML config of the pre-training that cells with a pretext task start from")
    add("--launcher", default="python", choices=LAUNCHERS, help="how each run starts (default: python)")
    add("--launcher_args", default="", metavar="'ARGS'",
        help="extra launcher flags, e.g. '--nproc_per_node 8' (torchrun) or '--partition gpu --gres gpu:8' (sbatch)")
    add("--dry_run", action="store_true", help="print the command lines, run nothing")
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the study's own flags, the main.py flags after ``--``)."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def main_actions() -> dict[str, argparse.Action]:
    """main.py's flags by destination."""
    return {a.dest: a for a in build_main_parser()._actions if a.dest != "help"}


def pretext_keys(actions: dict[str, argparse.Action]) -> set[str]:
    """The flags that describe a pre-training: ssl_*, --tokenizer and every method's own flags."""
    methods = argparse.ArgumentParser(add_help=False)
    add_method_arguments(methods)
    return {key for key in actions if key.startswith("ssl_")} | {"tokenizer"} | {a.dest for a in methods._actions}


def parse_grid(items: list[str], actions: dict[str, argparse.Action]) -> dict[str, list[str]]:
    """``['ssl_task=none,mim', ...]`` -> ``{'ssl_task': ['none', 'mim'], ...}``, refusing unknown keys."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-")
        options = [value.strip() for value in values.split(",") if value.strip()]
        if not sep or not options:
            raise SystemExit(f"error: --grid {item!r}: expected KEY=V1,V2,...")
        if key not in actions:
            raise SystemExit(f"error: --grid {item!r}: {key!r} is not a main.py flag (see python main.py --help)")
        if key in MANAGED:
            raise SystemExit(f"error: --grid {item!r}: the study sets --{key} itself "
                             f"({'use --folds' if key == 'fraction_seed' else 'see the docstring'})")
        if key in grid:
            raise SystemExit(f"error: --grid {key} given twice; list all its values in one --grid")
        grid[key] = options
    return grid


def flag_args(key: str, value: str, action: argparse.Action) -> list[str]:
    """The command-line form of ``KEY=value``: on/off flags take true or false."""
    if action.nargs != 0:
        return [f"--{key}", value]
    if value.lower() not in ("true", "false"):
        raise SystemExit(f"error: --grid {key}: an on/off flag takes true or false, got {value!r}")
    on = value.lower() == "true"
    if isinstance(action, argparse.BooleanOptionalAction):
        return [f"--{key}" if on else f"--no-{key}"]
    return [f"--{key}"] if on == isinstance(action, argparse._StoreTrueAction) else []


def without_budget(flags: list[str]) -> list[str]:
    """``flags`` less --train_fraction and --shots (with their values): labels are the fine-tunes' business."""
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag.split("=", 1)[0] in BUDGET_FLAGS:
            skip = "=" not in flag
        else:
            kept.append(flag)
    return kept


def resolve(flags: list[str]) -> argparse.Namespace:
    """main.py's values for ``flags`` (YAML and flags, no validation: checkpoints may not exist yet)."""
    parser = build_main_parser()
    config = parser.parse_known_args(flags)[0].config
    parser.set_defaults(**(load_yaml_config(parser, config) if config else {}))
    return parser.parse_args(flags)


def has_budget(values: argparse.Namespace) -> bool:
    return values.train_fraction < 1 or values.shots is not None


def names_task(values: argparse.Namespace) -> bool:
    return values.ssl_task != "none" or values.ssl_method != "none"


def slug(key: str, value: str) -> str:
    """``key-value`` with what a folder name should not hold replaced by '_'."""
    return f"{key}-{re.sub(r'[^A-Za-z0-9._-]+', '_', value)}"


def cli_flags(values: dict[str, str], actions: dict[str, argparse.Action]) -> list[str]:
    return [flag for key, value in values.items() for flag in flag_args(key, value, actions[key])]


def pretraining(values: dict[str, str], pretext: set[str], actions: dict[str, argparse.Action],
                args: argparse.Namespace, extra: list[str], pretrains: dict[str, Run]) -> Run | None:
    """The pre-training a cell starts from, shared by the cells with the same pretext values
    (kept in ``pretrains``); None where it names no task (the baseline)."""
    pre_values = {key: value for key, value in values.items() if key in pretext}
    flags = ["--config", args.pretrain_config, *without_budget(extra), *cli_flags(pre_values, actions)]
    if not names_task(resolve(flags)):
        return None
    name = "__".join(["pretrain", *(slug(key, value) for key, value in pre_values.items())])
    return pretrains.setdefault(name, Run(name, "pretrain", name, pre_values, None, str(Path(args.out) / name), flags))


def plan(args: argparse.Namespace, extra: list[str]) -> list[Run]:
    """Every run of the study, pre-trainings first, each fine-tune after the one it needs."""
    actions = main_actions()
    grid = parse_grid(args.grid, actions)
    pretext = pretext_keys(actions) if args.pretrain_config else set()
    if args.folds < 1:
        raise SystemExit(f"error: --folds must be >= 1, got {args.folds}")
    if args.pretrain_config and resolve(["--config", args.config, *extra]).ssl_mode == "pretrain":
        raise SystemExit(f"error: --pretrain_config: {args.config} is a pre-training config (--ssl_mode pretrain); "
                         "give the fine-tuning config as --config")
    pretrains: dict[str, Run] = {}
    finetunes: list[Run] = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        cell = "__".join(slug(key, value) for key, value in values.items()) or "base"
        pretrain = pretraining(values, pretext, actions, args, extra, pretrains) if args.pretrain_config else None
        tune = {key: value for key, value in values.items() if key not in pretext}
        flags = ["--config", args.config, *extra, *cli_flags(tune, actions)]
        folds = args.folds if has_budget(resolve(flags)) else 1  # all labels: every seed picks the same images
        finetunes += [Run(f"{cell}__fold-{fold}", "finetune", cell, values, fold,
                          str(Path(args.out) / f"{cell}__fold-{fold}"), [*flags, "--fraction_seed", str(fold)],
                          pretrain.name if pretrain else None) for fold in range(folds)]
    runs = [*pretrains.values(), *finetunes]
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        raise SystemExit(f"error: grid values give the same run name twice: "
                         f"{sorted({n for n in names if names.count(n) > 1})}; use plainer values")
    return runs


def is_finished(run_dir: Path) -> bool:
    """Whether the run's log.jsonl holds the last epoch that its config.yaml asks for."""
    config, log = run_dir / "config.yaml", run_dir / "log.jsonl"
    if not config.is_file() or not log.is_file():
        return False
    last = (yaml.safe_load(config.read_text()) or {}).get("epochs")
    epochs = {json.loads(line).get("epoch") for line in log.read_text().splitlines() if line.strip()}
    return last is not None and last - 1 in epochs


def display_path(path: Path) -> str:
    """``path`` relative to the working folder when inside it (shorter command lines), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


def main_flags(run: Run, runs: dict[str, Run]) -> list[str]:
    """The run's main.py flags: a fresh start (with --pretrain) or, when it has a checkpoint, --resume."""
    checkpoint = Path(run.output_dir) / "checkpoint.pth"
    if checkpoint.is_file():
        start = ["--resume", str(checkpoint)]
    elif run.pretrain:
        start = ["--pretrain", str(Path(runs[run.pretrain].output_dir) / "checkpoint.pth")]
    else:
        start = []
    return [*run.flags, *start, "--output_dir", run.output_dir]


def launch_command(run: Run, flags: list[str], launcher: str, launcher_args: list[str]) -> list[str]:
    """The full command line of a run under ``launcher``."""
    program = [display_path(MAIN), *flags]
    if launcher == "torchrun":
        return ["torchrun", *launcher_args, *program]
    python = [sys.executable, *program]
    if launcher == "sbatch":
        return ["sbatch", "--wait", "--job-name", run.name, "--output", str(Path(run.output_dir) / "slurm-%j.out"),
                *launcher_args, "--wrap", shlex.join(python)]
    return python


def write_study(path: Path, args: argparse.Namespace, extra: list[str], runs: list[Run]) -> None:
    """Rewrite study.json atomically (a temporary file renamed over it)."""
    study = {"config": args.config, "pretrain_config": args.pretrain_config, "grid": args.grid, "folds": args.folds,
             "launcher": args.launcher, "extra_flags": extra, "runs": [asdict(run) for run in runs]}
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(study, indent=1) + "\n")
    os.replace(temporary, path)


def execute(command: list[str]) -> int:
    """Run a command to its end; on Ctrl-C (which the run gets too) wait while it saves and stops."""
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return process.wait()


def run_one(run: Run, runs: dict[str, Run], args: argparse.Namespace, launcher_args: list[str]) -> int | None:
    """Run one study entry and set its status; the exit code, or None when it did not start."""
    needed = runs.get(run.pretrain) if run.pretrain else None
    if needed is not None and needed.status not in ("done", "skipped"):
        run.status, run.error = "failed", f"its pre-training {needed.name} is {needed.status}"
        return None
    run.command = launch_command(run, main_flags(run, runs), args.launcher, launcher_args)
    Path(run.output_dir).mkdir(parents=True, exist_ok=True)
    code = execute(run.command)
    if code in INTERRUPTED:
        run.status, run.error = "pending", "interrupted (Ctrl-C): the next call resumes it"
    elif code == 0 and is_finished(Path(run.output_dir)):
        run.status, run.error = "done", None
    else:
        run.status = "failed"
        run.error = f"exit code {code}" if code else "stopped before its last epoch (the next call resumes it)"
    return code


def run_all(runs: list[Run], args: argparse.Namespace, extra: list[str], launcher_args: list[str]) -> bool:
    """Run the unfinished runs in order, rewriting study.json after each; False when Ctrl-C stopped it."""
    by_name = {run.name: run for run in runs}
    for index, run in enumerate(runs, 1):
        if run.status == "skipped":
            print(f"[{index}/{len(runs)}] {run.name}: finished, skipped", flush=True)
            continue
        print(f"[{index}/{len(runs)}] {run.name}: {shlex.join(main_flags(run, by_name))}", flush=True)
        code = run_one(run, by_name, args, launcher_args)
        write_study(Path(args.out) / STUDY_FILE, args, extra, runs)
        if code in INTERRUPTED:
            print(f"interrupted: {run.name} saved its checkpoint; run the same command again to resume", flush=True)
            return False
    return True


def report(runs: list[Run], out: Path) -> int:
    """Print the counts by status and the failures; the exit code (1 if any run failed)."""
    counts = {status: sum(run.status == status for run in runs) for status in ("done", "skipped", "failed")}
    print(f"study {out}: {counts['done']} done, {counts['skipped']} skipped (finished before), {counts['failed']} "
          f"failed; compare with: python scripts/compare_runs.py {out} --out {out / 'report'}", flush=True)
    for run in runs:
        if run.status == "failed":
            print(f"  failed: {run.name}: {run.error} (log: {Path(run.output_dir) / 'log.txt'})")
    return 1 if counts["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    own, extra = split_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    launcher_args = shlex.split(args.launcher_args)
    runs = plan(args, extra)
    by_name = {run.name: run for run in runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        run.command = launch_command(run, main_flags(run, by_name), args.launcher, launcher_args)
        run.status = "skipped" if is_finished(Path(run.output_dir)) else "pending"
    tuned = {run.cell for run in runs if run.kind == "finetune"}
    single = tuned - {run.cell for run in runs if run.fold}
    if args.folds > 1 and single:
        print(f"# {len(single)} of {len(tuned)} cells train on every labelled image: one fold each (every "
              "--fraction_seed would choose the same images)")
    write_study(out / STUDY_FILE, args, extra, runs)
    if args.dry_run:
        for run in runs:
            print(f"# {run.name}: finished, skipped" if run.status == "skipped" else shlex.join(run.command))
        return 0
    if not run_all(runs, args, extra, launcher_args):
        return 130
    return report(runs, out)


if __name__ == "__main__":
    sys.exit(main())
