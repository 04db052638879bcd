"""Databricks / Dataproc entry point: one stage on the cluster's session (a job task).

    python jobs/run_stage.py STAGE [--workdir DIR] [--profile databricks] [--input PATH]
        [--limit N] [--expert NAME] [--force] [--origin O --origin-version V]
        [--output FILE] [--base BASE] [--model URI] [--split S] [--version N]
        [--set section.key=value ...]

STAGE is ingest, expert, distill, apply, stats, export, sft_pairs, train, refine (refine,
then apply and stats of its programs) or promote (``--version N`` becomes @champion). The stage's statistics are
printed as JSON; the exit status is non-zero when the stage fails.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

STAGES = ("ingest", "expert", "distill", "apply", "stats", "export", "sft_pairs", "train", "refine", "promote")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="refinex stage (cluster job task)")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--workdir", default=None, help="run folder (default: the profile's workdir)")
    parser.add_argument("--profile", default="databricks", help="config profile name or YAML path")
    parser.add_argument("--input", action="append", default=[], help="ingest: input file, folder or glob")
    parser.add_argument("--limit", type=int, default=None, help="ingest: only the first N records")
    parser.add_argument("--expert", default=None, help="expert, distill: expert name")
    parser.add_argument("--force", action="store_true", help="expert, refine: redo done documents; train: retrain")
    parser.add_argument("--origin", default=None, help="apply, stats, export: program origin")
    parser.add_argument("--origin-version", default=None, help="apply, stats, export: program version")
    parser.add_argument("--output", default=None, help="export: output JSONL file")
    parser.add_argument("--base", default=None, help="sft_pairs, train: base of the refine model")
    parser.add_argument("--model", default=None, help="refine: model URI (default: models:/refinex-refiner@champion)")
    parser.add_argument("--split", default=None, help="refine: only the train or validation documents")
    parser.add_argument("--version", default=None, help="promote: registered version")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    args = parser.parse_args(argv)
    if args.stage == "ingest" and not args.input:
        parser.error("ingest needs --input")
    if args.stage == "export" and not args.output:
        parser.error("export needs --output")
    if args.stage == "promote" and not args.version:
        parser.error("promote needs --version")

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
    elif args.stage == "export":
        from refinex.spark.apply import run_export

        stats = run_export(spark, config, workdir, args.output, **origin)
    elif args.stage == "sft_pairs":
        from refinex.spark.sft import run_sft_pairs

        stats = run_sft_pairs(spark, config, workdir, base=args.base)
    elif args.stage == "train":
        from refinex.spark.train import run_train

        stats = run_train(spark, config, workdir, base=args.base, force=args.force)
    elif args.stage == "refine":
        from refinex.spark.apply import run_apply
        from refinex.spark.refine import run_refine
        from refinex.spark.stats import run_stats

        model = args.model or f"models:/{config.model.registered_name}@{config.model.champion_alias}"
        refined = run_refine(spark, config, workdir, model, split=args.split, force=args.force)
        chosen = {"origin": refined["origin"], "origin_version": refined["origin_version"]}
        stats = {"refine": refined, "apply": run_apply(spark, config, workdir, **chosen),
                 "stats": run_stats(spark, config, workdir, **chosen)}
    else:
        from refinex.spark.train import promote

        stats = promote(config, workdir, args.version)
    print(json.dumps(stats, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
