"""Databricks / Dataproc entry point: the whole pipeline on the cluster's session.

    python jobs/pipeline.py --input dbfs:/Volumes/main/refinex/raw/pages.jsonl.gz \
        [--workdir dbfs:/Volumes/main/refinex/work] [--profile databricks] [--limit N] \
        [--base BASE | --model URI | --skip-train | --skip-model] [--set section.key=value ...]

Exits non-zero when any stage fails.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="refinex pipeline (cluster job)")
    parser.add_argument("--input", action="append", required=True, help="input file, folder or glob (repeatable)")
    parser.add_argument("--workdir", default=None, help="run folder (default: the profile's workdir)")
    parser.add_argument("--profile", default="databricks", help="config profile name or YAML path")
    parser.add_argument("--limit", type=int, default=None, help="only the first N input records")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--base", default=None, help="base of the refine model (default: model.base)")
    parser.add_argument("--model", default=None, help="refine with this model URI instead of training one")
    parser.add_argument("--skip-train", action="store_true", help="refine with models:/refinex-refiner@champion")
    parser.add_argument("--skip-model", action="store_true", help="stop after the distilled programs")
    args = parser.parse_args(argv)

    from refinex.config import load_config
    from refinex.spark.pipeline import format_summary, run_pipeline
    from refinex.spark.session import get_spark

    config = load_config(args.profile, args.overrides)
    workdir = args.workdir or config.workdir
    if not workdir:
        parser.error("no workdir: pass --workdir or set it in the profile")
    spark = get_spark(config, workdir)
    result = run_pipeline(
        spark, config, workdir, args.input, limit=args.limit, base=args.base, model_uri=args.model,
        train=not args.skip_train, refine=not args.skip_model,
    )
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
