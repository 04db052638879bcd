"""Quality gates of ``refinex validate``: what a program origin's outputs must satisfy.

- :mod:`refinex.quality.checks` (pure): the deletion-only check, the gate catalogue with
  severities and thresholds from ``config.quality``, gate results and the readable summary.
- :mod:`refinex.quality.gx_gates`: runs the catalogue as Great Expectations suites over
  Spark DataFrames and turns GX's validation results back into gate results.

The stage itself (reading the tables, writing ``gate_failures`` and the reports) is
:mod:`refinex.spark.validate`.
"""
