"""Databricks / Dataproc entry point: one stage on the cluster's session (a job task).

    python jobs/run_stage.py STAGE [--workdir DIR] [--profile databricks] [--input PATH]
        [--limit N] [--expert NAME] [--force] [--origin O --origin-version V]
        [--output FILE] [--set section.key=value ...]

STAGE is ingest, expert, distill, apply, stats or export. The stage's statistics are
printed as JSON; the exit status is non-zero when the stage fails.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

STAGES = ("ingest", "expert", "distill", "apply", "stats", "export")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="refinex stage (cluster job task)")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--workdir", default=None, help="run folder (default: the profile's workdir)")
    parser.add_argument("--profile", default="databricks", help="config profile name or YAML path")
    parser.add_argument("--input", action="append", default=[], help="ingest: input file, folder or glob")
    parser.add_argument("--limit", type=int, default=None, help="ingest: only the first N records")
    parser.add_argument("--expert", default=None, help="expert, distill: expert name")
    parser.add_argument("--force", action="store_true", help="expert: refine again")
    parser.add_argument("--origin", default=None, help="apply, stats, export: program origin")
    parser.add_argument("--origin-version", default=None, help="apply, stats, export: program version")
    parser.add_argument("--output", default=None, help="export: output JSONL file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    args = parser.parse_args(argv)
    if args.stage == "ingest" and not args.input:
        parser.error("ingest needs --input")
    if args.stage == "export" and not args.output:
        parser.error("export needs --output")

    from refinex.config import load_config
    from refinex.spark.session import get_spark

    config = load_config(args.profile, args.overrides)
    workdir = args.workdir or config.workdir
    if not workdir:
        parser.error("no workdir: pass --workdir or set it in the profile")
    spark = get_spark(config, workdir)
    origin = {"origin": args.origin, "origin_version": args.origin_version}
    stats: dict[str, Any]
    if args.stage == "ingest":
        from refinex.spark.ingest import run_ingest

        stats = run_ingest(spark, config, workdir, args.input, limit=args.limit)
    elif args.stage == "expert":
        from refinex.spark.expert import run_expert

        stats = run_expert(spark, config, workdir, expert=args.expert, force=args.force)
    elif args.stage == "distill":
        from refinex.spark.distill import run_distill

        stats = run_distill(spark, config, workdir, expert=args.expert)
    elif args.stage == "apply":
        from refinex.spark.apply import run_apply

        stats = run_apply(spark, config, workdir, **origin)
    elif args.stage == "stats":
        from refinex.spark.stats import run_stats

        stats = run_stats(spark, config, workdir, **origin)
    else:
        from refinex.spark.apply import run_export

        stats = run_export(spark, config, workdir, args.output, **origin)
    print(json.dumps(stats, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
