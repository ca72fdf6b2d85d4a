"""The paper's comparison by one command: ``python -m experiments.compare --config experiments/configs/compare_quickstart.yaml``.

Stages (a progress line each; everything resumable, so rerunning the command continues where it stopped):

1. data: the train/val/test splits, with frontal volumes for the no-alignment ablation (the
   synthetic generator resumes a partial file and skips a finished one), and the real photos of
   ``real_photos`` converted into ``DATA_DIR/real.h5`` (reused when finished; an absent folder is skipped
   with a note);
2. training: each landmark detector and each method, in ``OUT/runs/NAME`` (a finished run, one with
   ``metrics.json``, is reused; an interrupted one resumes from its ``last.ckpt``);
3. evaluation: every method, VRN-Guided with ground-truth and with detected landmarks, and the
   baselines (the 3DMM fit to detected landmarks, the mean training volume, and the mean shape at
   the ground-truth pose, an oracle), all on the same test split, and on the real photos, through the same
   test path as ``experiments.evaluate`` (``OUT/eval/NAME/test.csv``, ``OUT/eval-real/NAME/test.csv``; a
   finished report is reused);
4. the report in ``OUT``: ``table.md`` and ``table.csv`` in the layout of the paper's Table 1 with
   bootstrap 95% intervals and each method's paired difference from the reference method (VRN), real-photo
   columns beside them (docs/evaluation.md, "Real photos beside the synthetic test split"), the config's
   ``contrasts`` (paired differences between any two rows) in a second table and ``contrasts.csv``,
   ``ced.png`` (Figure 7), ``nme_vs_yaw.png`` (Figure 10), ``nme_per_expression.png`` (Figure 11).

The settings are :class:`CompareSettings`; ``experiments/configs/compare_quickstart.yaml`` (CPU, about
38 min per seed on 2 cores, estimated) and ``compare_paper.yaml`` (the paper's sizes, for a GPU) are the shipped ones.

``--runs DIR...`` makes the same report from finished runs (:func:`compare_runs`), and ``--wandb
ENTITY/PROJECT`` from the finished trainings of a W&B project (:mod:`experiments.wandb_project`), both without
real-photo columns (they load no model; ``experiments.evaluate --real-data`` scores a run's checkpoint on them);
docs/dashboards.md says how runs are grouped and what the intervals cover. ``--runs`` refuses, in one line
naming the run and the fix: a run still training (its ``run.lock`` held; in a folder of runs it is left out
with a note, as an unfinished one is), runs tested on different test files (by content: the SHA-256 each
test recorded in metrics.json), and a damaged (say truncated) config.yaml, metrics.json or nme/test.csv. A run
tested before the SHA-256 was recorded is assumed to have been tested on the file now at its path, as a
note on stderr and in the report says.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from experiments.compare.finished_runs import compare_runs
from experiments.compare.pipeline import run_compare
from experiments.compare.settings import load_compare_settings
from experiments.wandb_project import fetch_runs
from lightning_vrn.cli import run_command
from lightning_vrn.metrics.bootstrap import DEFAULT_RESAMPLES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="train and evaluate: e.g. experiments/configs/compare_quickstart.yaml")
    source.add_argument("--runs", nargs="+", type=Path,
                        help="collect finished runs: run directories or folders of them (runs/sweeps/NAME)")
    source.add_argument("--wandb", metavar="ENTITY/PROJECT",
                        help="collect the finished training runs of a W&B project (needs the network and an API key)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the compare settings (--config)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare-runs"),
                        help="--runs, --wandb: the report's folder")
    parser.add_argument("--wandb-tag", action="append", default=[], metavar="TAG",
                        help="--wandb: only runs with this tag (repeat for several: runs with all of them)")
    parser.add_argument("--group-by", default="model.name",
                        help="--runs, --wandb: config key of the rows (default model.name)")
    parser.add_argument("--reference", default=None,
                        help="--runs, --wandb: the row others are paired with (default vrn)")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="--runs, --wandb: bootstrap resamples")
    parser.add_argument("--log-wandb", action=argparse.BooleanOptionalAction, default=None,
                        help="--config: log each method's evaluation into a W&B eval run linked to its training run "
                             "(default: when the trainings had logger.wandb=true)")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before or after --options
    if args.wandb_tag and not args.wandb:
        parser.error("--wandb-tag selects runs of --wandb ENTITY/PROJECT")
    if args.runs or args.wandb:
        if args.overrides:
            parser.error(f"key=value overrides are for --config, not --runs or --wandb: {args.overrides}")
        runs = args.runs or fetch_runs(args.wandb, args.out / "wandb-runs", args.wandb_tag)
        compare_runs(runs, args.out, args.group_by, args.reference, args.resamples)
        print((args.out / "table.md").read_text())
        print(f"outputs in {args.out}: table.md, table.csv, runs.csv, ced.png, nme_vs_yaw.png, nme_per_expression.png")
        return 0
    settings = load_compare_settings(args.config, args.overrides)
    start = time.time()
    run_compare(settings, wandb=args.log_wandb)
    print((Path(settings.out) / "table.md").read_text())
    print(f"compare finished in {(time.time() - start) / 60:.1f} min; outputs in {settings.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
