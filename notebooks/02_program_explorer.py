# Databricks notebook source
# MAGIC %md
# MAGIC # Program explorer
# MAGIC
# MAGIC A sample of documents with their program: the raw text with the lines the program deletes struck
# MAGIC through (and the strings `remove_str` cuts highlighted), the refined text, and the program itself, side
# MAGIC by side. Deletions are recomputed with refinex's own executor (`refinex.notebook.deletion_marks`), so
# MAGIC what is marked is exactly what `apply` deleted; program text is parsed, never evaluated, and every
# MAGIC document field is HTML-escaped.
# MAGIC
# MAGIC **Widgets**: `origin` (`distilled`: the expert's edits as programs; `model`: the refine model's),
# MAGIC `version` (an `origin_version`; empty: the most recently written one of that origin), `seed` and `n`
# MAGIC (which documents and how many: the same seed gives the same sample), `doc_ids` (comma-separated ids
# MAGIC to show instead of a sample), `max_lines` (lines shown per text), plus `workdir`, `profile` and
# MAGIC `overrides` (as in the edit statistics notebook).
# MAGIC
# MAGIC On Databricks the page is shown with `displayHTML`; locally it is written to
# MAGIC `<workdir>/reports/notebooks/program_explorer.html`.

# COMMAND ----------

# DBTITLE 1,Attach to the workdir
try:
    import refinex  # noqa: F401 - installed on the cluster (the bundle's wheel) or locally
except ImportError:  # a Git folder of this repository: its root is the notebook folder's parent
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.getcwd()))

from pyspark.sql import functions as F

from refinex.notebook import attach, render_explorer, widget

ctx = attach(widget("workdir", ""), widget("profile", ""), spark=spark, overrides=widget("overrides", ""))
origin = widget("origin", "distilled", choices=["distilled", "model"])
version = widget("version", "").strip()
seed = int(widget("seed", "0"))
n = int(widget("n", "5"))
doc_ids = [d.strip() for d in widget("doc_ids", "").split(",") if d.strip()]
max_lines = int(widget("max_lines", "400"))
print(ctx.tables.describe())

# COMMAND ----------

# MAGIC %md
# MAGIC ## Which programs there are

# COMMAND ----------

# MAGIC %sql
# MAGIC SELECT origin, origin_version, count(*) AS documents,
# MAGIC        count_if(status = 'refined') AS refined, count_if(status = 'unchanged') AS unchanged,
# MAGIC        count_if(status NOT IN ('refined', 'unchanged')) AS other,
# MAGIC        round(avg(exec_stats.deletion_ratio), 4) AS mean_deletion_ratio,
# MAGIC        max(created_at) AS last_written
# MAGIC FROM refined_documents
# MAGIC GROUP BY origin, origin_version
# MAGIC ORDER BY origin, last_written DESC

# COMMAND ----------

# DBTITLE 1,The version to explore
refined = ctx.table("refined_documents").where(F.col("origin") == origin)
if not version:
    latest = refined.groupBy("origin_version").agg(F.max("created_at").alias("at")).orderBy(F.desc("at")).first()
    version = latest["origin_version"] if latest is not None else ""
print(f"origin {origin}, version {version or '(none: no refined documents of this origin)'}")

# COMMAND ----------

# DBTITLE 1,Sample the documents
chosen = refined.where(F.col("origin_version") == version)
if doc_ids:
    chosen = chosen.where(F.col("doc_id").isin(doc_ids))
# A seeded, deterministic sample: the n documents with the smallest hash of (doc_id, seed).
sample = (
    chosen.withColumn("_order", F.xxhash64("doc_id", F.lit(seed)))
    .orderBy("_order")
    .limit(len(doc_ids) if doc_ids else n)
    .select(
        "doc_id", "origin", "origin_version", "refined_text", "status", "_order",
        *[F.col(f"exec_stats.{k}").alias(k) for k in ("deletion_ratio", "ops_total", "lines_removed", "chars_removed")],
    )
)
documents = ctx.table("documents").select("doc_id", "text", "source", "url", "shard")
programs = ctx.table("programs").select("doc_id", "origin", "origin_version", "program")
rows = (
    sample.join(documents, "doc_id", "left")
    .join(programs, ["doc_id", "origin", "origin_version"], "left")
    .orderBy("_order")
    .drop("_order")
    .collect()
)
docs = [row.asDict() for row in rows]
summary = sample.drop("refined_text", "_order")
display(summary)

# COMMAND ----------

# DBTITLE 1,Raw vs refined, with the program
page = render_explorer(
    docs,
    title=f"Program explorer: {origin} programs",
    subtitle=f"{version} · {len(docs)} document(s) · seed {seed}",
    max_lines=max_lines,
)
explorer_path = ctx.show(page, "program_explorer.html")
