"""Cluster entry point for the whole pipeline: ``python jobs/pipeline.py [the flags of `refinex pipeline`]``.

The same command line as ``refinex pipeline`` (one parser: ``refinex.cli``); the profile
defaults to ``$REFINEX_CONFIG`` or ``--config``.
"""
import sys

from refinex.cli import main

if __name__ == "__main__":
    main(["pipeline", *sys.argv[1:]])
