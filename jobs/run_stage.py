"""Cluster entry point for one stage (a ``spark_python_task`` or ``gcloud dataproc jobs submit``).

    python jobs/run_stage.py STAGE [the flags of `refinex STAGE`]

The same command line as the ``refinex`` CLI (one parser: ``refinex.cli``); the profile
defaults to ``$REFINEX_CONFIG`` (set it to ``databricks`` or ``dataproc``) or ``--config``.
"""
import sys

from refinex.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
