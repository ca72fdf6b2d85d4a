"""A W&B report that compares the variants of a project: ``python -m experiments.dashboard ENTITY/PROJECT``.

The report shows the project's finished trainings (evaluation runs left out), grouped by a config key
(default ``model.name``, the variant; ``--wandb-tag`` narrows them):

- bar charts of the test NME, aligned NME, NME per |yaw| bucket and the balanced landmark NME, each group's
  mean over its runs with the standard error over runs as the error bar;
- learning curves: validation NME, validation and training loss, validation IoU (group means);
- a run comparer listing the config keys in which the runs differ;
- a note saying what the error bars cover and how to get the per-face intervals (``compare --wandb``).

The definition is written as JSON to ``--out`` without a network (W&B's report format, as W&B would store
it); ``--save`` also saves it to the W&B server (the network and an API key needed) and prints its URL. It
uses ``wandb-workspaces``, W&B's library for report definitions, rather than writing W&B's JSON by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from experiments.config import ConfigError
from experiments.wandb_project import parse_project
from lightning_vrn.atomic import write_text
from lightning_vrn.cli import run_command
from lightning_vrn.metrics.report import YAW_BUCKETS_DEG

TEST_BARS = {
    "test NME": ["test/nme"],
    "test NME, rigidly aligned": ["test/nme_aligned"],
    "test NME per |yaw| bucket (degrees)": [f"test/nme_yaw_{lo}_{hi}" for lo, hi in YAW_BUCKETS_DEG],
    "test 2D landmark NME, balanced over |yaw| (variants with landmarks)": ["test/landmark_nme_balanced"],
}
"""Bar chart title -> the summary metrics it shows, as training logs them."""

CURVES = {
    "validation NME": ("epoch", ["val/nme"]),
    "validation loss": ("epoch", ["val/loss"]),
    "training loss": ("trainer/global_step", ["train/loss"]),
    "validation voxel IoU": ("epoch", ["val/iou"]),
}
"""Line plot title -> (x axis, the logged metrics it plots)."""


def report_metrics() -> set[str]:
    """Every metric the report's panels read (for checking them against what training logs)."""
    return {m for metrics in TEST_BARS.values() for m in metrics} | {m for _, metrics in CURVES.values() for m in metrics}


def build_report(project: str, group_by: str = "model.name", tags: Sequence[str] = (), title: str | None = None):
    """The report (a ``wandb_workspaces.reports.v2.Report``) on the W&B ``project`` (``ENTITY/PROJECT``): its
    finished non-evaluation runs with every tag in ``tags``, grouped by the config key ``group_by``."""
    import wandb_workspaces.reports.v2 as wr

    entity, name = parse_project(project).split("/")
    filters = " and ".join(["JobType != 'eval'", "State = 'finished'", *(f"Tags in [{tag!r}]" for tag in tags)])
    runs = wr.Runset(name="finished trainings", filters=filters, groupby=[f"config.{group_by}"])
    bars = [wr.BarPlot(title=bar_title, metrics=metrics, groupby_aggfunc="mean", groupby_rangefunc="stderr")
            for bar_title, metrics in TEST_BARS.items()]
    curves = [wr.LinePlot(title=curve_title, x=x, y=metrics, groupby_aggfunc="mean", groupby_rangefunc="stderr")
              for curve_title, (x, metrics) in CURVES.items()]
    tagged = f" tagged {', '.join(tags)}" if tags else ""
    note = (f"Finished trainings of {project}{tagged}, one group per `{group_by}`. A bar is the group's mean over "
            "its runs and its error bar the standard error over runs (seeds): with one run per group there is "
            "no error bar, and none of these bars pairs the methods face by face. For the paired 95% bootstrap "
            "intervals over test faces (the compare command's table), run "
            f"`python -m experiments.compare --wandb {project} --group-by {group_by}`.")
    return wr.Report(
        entity=entity, project=name, title=title or f"VRN variants by {group_by}",
        description=f"lightning-vrn: test NME and learning curves of {project}, grouped by {group_by}",
        blocks=[
            wr.MarkdownBlock(text=note),
            wr.H2(text="Test NME"),
            wr.PanelGrid(runsets=[runs], panels=bars),
            wr.H2(text="Learning curves"),
            wr.PanelGrid(runsets=[runs], panels=curves),
            wr.H2(text="Settings that differ"),
            wr.PanelGrid(runsets=[runs], panels=[wr.RunComparer(diff_only="split")]),
        ])


def report_json(report) -> dict:
    """The report's definition in W&B's format (built without a network: its run sets name no other project).
    ``_to_model`` is the library's own serialisation, the one ``save`` sends; it has no public name."""
    return json.loads(report._to_model().model_dump_json(by_alias=True, exclude_none=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", metavar="ENTITY/PROJECT")
    parser.add_argument("--group-by", default="model.name", help="config key of the groups (default model.name)")
    parser.add_argument("--wandb-tag", action="append", default=[], metavar="TAG",
                        help="only runs with this tag (repeat for several: runs with all of them)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help="the definition as JSON (default runs/wandb-report-ENTITY-PROJECT.json)")
    parser.add_argument("--save", action="store_true", help="also save the report to W&B (network, API key)")
    args = parser.parse_args(argv)
    report = build_report(args.project, args.group_by, args.wandb_tag, args.title)
    out = args.out or Path("runs") / f"wandb-report-{args.project.replace('/', '-')}.json"
    write_text(out, json.dumps(report_json(report), indent=2))
    print(f"report definition: {out}")
    if args.save:
        try:
            report.save()
        except Exception as error:  # no API key, no network, no such project
            raise ConfigError(f"cannot save the report to W&B project {args.project}: {error}. Check the name, "
                              f"the API key (WANDB_API_KEY or `wandb login`) and the network; the definition is in "
                              f"{out}") from None
        print(f"saved: {report.url}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
