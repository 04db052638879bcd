"""Spark + Delta adapters around the pure core.

``session`` builds the session (``jars`` finds Delta's jars for local runs), ``tables``
holds the table names, schemas and idempotent writers, and each stage has its module:
``ingest``, ``expert``, ``distill``, ``apply`` (and export), ``stats``, and for the refine
model ``sft`` (sft_pairs), ``train`` (MLflow registry) and ``refine``; ``pipeline`` runs
them in order. The pure modules (``refinex.program``, ``refinex.distill``, ``refinex.text``,
``refinex.experts``) are imported inside the ``mapInPandas`` functions, on the workers.
"""
