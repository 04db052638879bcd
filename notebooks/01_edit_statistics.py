# Databricks notebook source
# MAGIC %md
# MAGIC # Edit statistics
# MAGIC
# MAGIC What the deletion-only programs did to the corpus, from the `edit_stats` and `programs` tables of a
# MAGIC refinex workdir: how much text they delete by source, status and shard, how many operations a
# MAGIC document gets, which strings and lines are removed most often, and the distilled oracle against the
# MAGIC refine model.
# MAGIC
# MAGIC **Widgets**: `workdir` (empty: the profile's; locally `work/demo`), `profile` (empty: `databricks` on
# MAGIC Databricks, `default` elsewhere), `overrides` (`section.key=value` settings, space-separated, e.g.
# MAGIC `tables.catalog=dev`), `top_n` (rows of the "most removed" tables).
# MAGIC
# MAGIC Every SQL cell ends with a `SELECT`: on Databricks switch its result to a chart (`+` > Visualization).
# MAGIC The matplotlib figures below are the same charts; run locally they are saved as PNG files under
# MAGIC `<workdir>/reports/notebooks/`.

# COMMAND ----------

# DBTITLE 1,Attach to the workdir
try:
    import refinex  # noqa: F401 - installed on the cluster (the bundle's wheel) or locally
except ImportError:  # a Git folder of this repository: its root is the notebook folder's parent
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.getcwd()))

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from refinex.notebook import attach, widget

ctx = attach(widget("workdir", ""), widget("profile", ""), spark=spark, overrides=widget("overrides", ""))
top_n = int(widget("top_n", "20"))
print(ctx.tables.describe())
print("tables:", ", ".join(ctx.registered) or "none yet")


def short(version, width=28):
    """A legend-sized origin version."""
    version = str(version)
    return version if len(version) <= width else version[: width - 1] + "…"


def chart(name, pdf, draw, title, figsize=(9, 4)):
    """One matplotlib figure: ``draw(pdf, ax)``, or a note when there is no data."""
    fig, ax = plt.subplots(figsize=figsize)
    if pdf.empty:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#57606a")
        ax.set_axis_off()
    else:
        draw(pdf, ax)
    ax.set_title(title)
    fig.tight_layout()
    ctx.show(fig, name)
    plt.close(fig)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Overview by origin
# MAGIC One row per program origin and version: `distilled` (the expert's edits as programs, the oracle) and
# MAGIC `model` (the refine model's programs, `refinex-refiner/<version>`). `nb_edits` is `edit_stats` with a
# MAGIC short `series` label for the charts.

# COMMAND ----------

# MAGIC %sql
# MAGIC CREATE OR REPLACE TEMP VIEW nb_edits AS
# MAGIC SELECT *,
# MAGIC        concat(origin, ' ', CASE WHEN length(origin_version) > 28 THEN concat(left(origin_version, 27), '…')
# MAGIC                                 ELSE origin_version END) AS series
# MAGIC FROM edit_stats;
# MAGIC
# MAGIC SELECT origin, origin_version,
# MAGIC        count(*)                                               AS documents,
# MAGIC        round(avg(deletion_ratio), 4)                          AS mean_deletion_ratio,
# MAGIC        round(sum(chars_removed) / nullif(sum(chars_in), 0), 4) AS corpus_deletion_ratio,
# MAGIC        sum(chars_in)                                          AS chars_in,
# MAGIC        sum(chars_out)                                         AS chars_out,
# MAGIC        round(avg(ops_total), 2)                               AS ops_per_document,
# MAGIC        sum(ops_rejected)                                      AS ops_rejected,
# MAGIC        sum(parse_errors)                                      AS parse_errors,
# MAGIC        count_if(status = 'refined')                           AS refined,
# MAGIC        count_if(status = 'unchanged')                         AS unchanged,
# MAGIC        count_if(status = 'dropped')                           AS dropped,
# MAGIC        count_if(status = 'fallback_raw')                      AS fallback_raw,
# MAGIC        count_if(status NOT IN ('refined', 'unchanged', 'dropped', 'fallback_raw')) AS other_status
# MAGIC FROM nb_edits
# MAGIC GROUP BY origin, origin_version
# MAGIC ORDER BY origin, origin_version

# COMMAND ----------

# MAGIC %md
# MAGIC ## Deletion ratio by source

# COMMAND ----------

# MAGIC %sql
# MAGIC CREATE OR REPLACE TEMP VIEW nb_by_source AS
# MAGIC SELECT coalesce(source, '(none)') AS source, series, origin, origin_version,
# MAGIC        count(*)                                       AS documents,
# MAGIC        avg(deletion_ratio)                            AS mean_deletion_ratio,
# MAGIC        percentile_approx(deletion_ratio, 0.5)         AS median_deletion_ratio,
# MAGIC        percentile_approx(deletion_ratio, 0.9)         AS p90_deletion_ratio,
# MAGIC        sum(chars_removed) / nullif(sum(chars_in), 0)  AS corpus_deletion_ratio
# MAGIC FROM nb_edits
# MAGIC WHERE deletion_ratio IS NOT NULL
# MAGIC GROUP BY 1, 2, 3, 4;
# MAGIC
# MAGIC SELECT source, origin, origin_version, documents, round(mean_deletion_ratio, 4) AS mean_deletion_ratio,
# MAGIC        round(median_deletion_ratio, 4) AS median, round(p90_deletion_ratio, 4) AS p90,
# MAGIC        round(corpus_deletion_ratio, 4) AS corpus_deletion_ratio
# MAGIC FROM nb_by_source
# MAGIC ORDER BY source, origin, origin_version

# COMMAND ----------

by_source = spark.table("nb_by_source").toPandas()


def draw_by_source(pdf, ax):
    table = pdf.pivot_table(index="source", columns="series", values="mean_deletion_ratio")
    table.plot.barh(ax=ax, width=0.8)
    for bars in ax.containers:
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.set_xlabel("mean deletion ratio (per document)")
    ax.set_xlim(0, 1)
    ax.set_ylabel("")
    ax.legend(title="", fontsize=8, loc="lower right")


chart("deletion_by_source.png", by_source, draw_by_source, "Deletion ratio by source",
      figsize=(9, max(3, 0.5 * by_source["source"].nunique() + 2) if not by_source.empty else 3))

# COMMAND ----------

# MAGIC %md
# MAGIC ## By status and by shard
# MAGIC `refined` (the program deleted something), `unchanged`, `dropped` (too little was left),
# MAGIC `fallback_raw` (too many invalid operations: the raw text is kept), `expert_failed`, `no_program`.

# COMMAND ----------

# MAGIC %sql
# MAGIC CREATE OR REPLACE TEMP VIEW nb_by_status AS
# MAGIC SELECT series, origin, origin_version, status, count(*) AS documents,
# MAGIC        avg(deletion_ratio) AS mean_deletion_ratio, sum(chars_removed) AS chars_removed
# MAGIC FROM nb_edits
# MAGIC GROUP BY 1, 2, 3, 4;
# MAGIC
# MAGIC SELECT origin, origin_version, status, documents, round(mean_deletion_ratio, 4) AS mean_deletion_ratio,
# MAGIC        chars_removed
# MAGIC FROM nb_by_status
# MAGIC ORDER BY origin, origin_version, documents DESC

# COMMAND ----------

by_status = spark.table("nb_by_status").toPandas()


def draw_by_status(pdf, ax):
    counts = pdf.pivot_table(index="series", columns="status", values="documents", aggfunc="sum", fill_value=0)
    counts.plot.barh(ax=ax, stacked=True, width=0.6, colormap="tab10")
    ax.set_xlabel("documents")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("")
    ax.legend(title="status", fontsize=8)


chart("deletion_by_status.png", by_status, draw_by_status, "Documents by status")

# COMMAND ----------

# MAGIC %sql
# MAGIC CREATE OR REPLACE TEMP VIEW nb_by_shard AS
# MAGIC SELECT series, origin, origin_version, shard, count(*) AS documents,
# MAGIC        avg(deletion_ratio) AS mean_deletion_ratio,
# MAGIC        sum(chars_removed) / nullif(sum(chars_in), 0) AS corpus_deletion_ratio
# MAGIC FROM nb_edits
# MAGIC WHERE deletion_ratio IS NOT NULL
# MAGIC GROUP BY 1, 2, 3, 4;
# MAGIC
# MAGIC SELECT shard, origin, origin_version, documents, round(mean_deletion_ratio, 4) AS mean_deletion_ratio,
# MAGIC        round(corpus_deletion_ratio, 4) AS corpus_deletion_ratio
# MAGIC FROM nb_by_shard
# MAGIC ORDER BY shard, origin, origin_version

# COMMAND ----------

by_shard = spark.table("nb_by_shard").toPandas()


def draw_by_shard(pdf, ax):
    table = pdf.pivot_table(index="shard", columns="series", values="mean_deletion_ratio")
    table.plot.bar(ax=ax, width=0.8, rot=0)
    for bars in ax.containers:
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.set_ylabel("mean deletion ratio")
    ax.set_ylim(0, 1)
    ax.legend(title="", fontsize=8)


chart("deletion_by_shard.png", by_shard, draw_by_shard, "Deletion ratio by shard")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Operations per document
# MAGIC How many operations each program has: all of them (`ops_total`), `remove_lines` and `remove_str`.

# COMMAND ----------

# MAGIC %sql
# MAGIC CREATE OR REPLACE TEMP VIEW nb_ops AS
# MAGIC SELECT series, origin, origin_version, op, n_ops, count(*) AS documents
# MAGIC FROM (
# MAGIC   SELECT series, origin, origin_version,
# MAGIC          stack(3, 'ops_total', ops_total, 'remove_lines', n_remove_lines, 'remove_str', n_remove_str) AS (op, n_ops)
# MAGIC   FROM nb_edits
# MAGIC   WHERE ops_total IS NOT NULL
# MAGIC )
# MAGIC GROUP BY 1, 2, 3, 4, 5;
# MAGIC
# MAGIC SELECT origin, origin_version, op,
# MAGIC        sum(documents)                                    AS documents,
# MAGIC        round(sum(n_ops * documents) / sum(documents), 2) AS mean_per_document,
# MAGIC        max(n_ops)                                        AS max_per_document,
# MAGIC        sum(IF(n_ops = 0, documents, 0))                  AS documents_without
# MAGIC FROM nb_ops
# MAGIC GROUP BY origin, origin_version, op
# MAGIC ORDER BY origin, origin_version, op

# COMMAND ----------

ops = spark.table("nb_ops").toPandas()
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
for ax, op in zip(axes, ("ops_total", "remove_lines", "remove_str")):
    part = ops[ops["op"] == op] if not ops.empty else ops
    if part.empty:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#57606a")
    else:
        table = part.pivot_table(index="n_ops", columns="series", values="documents", aggfunc="sum", fill_value=0)
        table = table.reindex(range(int(table.index.min()), int(table.index.max()) + 1), fill_value=0)
        table.plot.bar(ax=ax, width=0.8, rot=0, legend=op == "ops_total")
        if op == "ops_total":
            ax.legend(title="", fontsize=8)
    ax.set_title(op)
    ax.set_xlabel("operations in the document's program")
axes[0].set_ylabel("documents")
axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
fig.suptitle("Operations per document")
fig.tight_layout()
ctx.show(fig, "ops_per_document.png")
plt.close(fig)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Most often removed strings and lines
# MAGIC `refinex_removed_strings(program)` reads the `remove_str` operations with refinex's own parser (program
# MAGIC text is never evaluated); `refinex_removed_lines(program, text)` gives the lines the program's accepted
# MAGIC `remove_lines` delete (execution semantics), blank lines left out. Both are registered by `attach`.

# COMMAND ----------

# MAGIC %sql
# MAGIC CREATE OR REPLACE TEMP VIEW nb_removed_strings AS
# MAGIC SELECT origin, removed AS string, count(*) AS times, count(DISTINCT doc_id) AS documents,
# MAGIC        row_number() OVER (PARTITION BY origin ORDER BY count(*) DESC, removed) AS rank
# MAGIC FROM (SELECT origin, doc_id, explode(refinex_removed_strings(program)) AS removed FROM programs)
# MAGIC GROUP BY origin, removed;
# MAGIC
# MAGIC SELECT origin, rank, string, times, documents
# MAGIC FROM nb_removed_strings
# MAGIC WHERE rank <= CAST(:top_n AS INT)
# MAGIC ORDER BY origin, rank

# COMMAND ----------

# MAGIC %sql
# MAGIC CREATE OR REPLACE TEMP VIEW nb_removed_lines AS
# MAGIC SELECT origin, line, count(*) AS times, count(DISTINCT doc_id) AS documents,
# MAGIC        row_number() OVER (PARTITION BY origin ORDER BY count(DISTINCT doc_id) DESC, count(*) DESC, line) AS rank
# MAGIC FROM (
# MAGIC   SELECT p.origin, p.doc_id, trim(removed) AS line
# MAGIC   FROM (SELECT p.origin, p.doc_id, explode(refinex_removed_lines(p.program, d.text)) AS removed
# MAGIC         FROM programs p JOIN documents d ON p.doc_id = d.doc_id) AS p
# MAGIC )
# MAGIC WHERE line <> ''
# MAGIC GROUP BY origin, line;
# MAGIC
# MAGIC SELECT origin, rank, left(line, 160) AS line, times, documents
# MAGIC FROM nb_removed_lines
# MAGIC WHERE rank <= CAST(:top_n AS INT)
# MAGIC ORDER BY origin, rank

# COMMAND ----------

def label(text, width=60):
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def draw_top(column, value):
    def draw(pdf, ax):
        origins = list(dict.fromkeys(pdf["origin"]))
        colors = dict(zip(origins, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
        rows = pdf.sort_values([value, column], ascending=[True, False])
        ax.barh([f"{label(t)}  [{o}]" for t, o in zip(rows[column], rows["origin"])], rows[value],
                color=[colors[o] for o in rows["origin"]])
        ax.set_xlabel(value)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(axis="y", labelsize=8)
    return draw


for view, column, value, name, title in (
    ("nb_removed_strings", "string", "times", "removed_strings.png", "Most often removed strings (remove_str)"),
    ("nb_removed_lines", "line", "documents", "removed_lines.png", "Most often removed lines (documents)"),
):
    top = spark.table(view).where(f"rank <= {min(top_n, 15)}").toPandas()
    chart(name, top, draw_top(column, value), title, figsize=(10, max(3, 0.28 * len(top) + 1.5)))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Distilled oracle vs refine model
# MAGIC Documents that have both a distilled program and a model program, side by side: how close the
# MAGIC model's deletion ratio is to the oracle's, and whether they end in the same status.

# COMMAND ----------

# MAGIC %sql
# MAGIC CREATE OR REPLACE TEMP VIEW nb_compare AS
# MAGIC SELECT o.doc_id, o.source,
# MAGIC        o.origin_version  AS oracle_version,   m.origin_version  AS model_version,
# MAGIC        o.status          AS oracle_status,    m.status          AS model_status,
# MAGIC        o.deletion_ratio  AS oracle_deletion,  m.deletion_ratio  AS model_deletion,
# MAGIC        o.lines_removed   AS oracle_lines_removed, m.lines_removed AS model_lines_removed,
# MAGIC        o.ops_total       AS oracle_ops,       m.ops_total       AS model_ops
# MAGIC FROM edit_stats o JOIN edit_stats m ON o.doc_id = m.doc_id
# MAGIC WHERE o.origin = 'distilled' AND m.origin = 'model';
# MAGIC
# MAGIC SELECT oracle_version, model_version,
# MAGIC        count(*)                                            AS documents,
# MAGIC        round(avg(oracle_deletion), 4)                      AS oracle_mean_deletion,
# MAGIC        round(avg(model_deletion), 4)                       AS model_mean_deletion,
# MAGIC        round(avg(abs(model_deletion - oracle_deletion)), 4) AS mean_abs_difference,
# MAGIC        round(try_divide(covar_pop(oracle_deletion, model_deletion),
# MAGIC                         stddev_pop(oracle_deletion) * stddev_pop(model_deletion)), 4) AS correlation,
# MAGIC        round(avg(IF(oracle_status = model_status, 1.0, 0.0)), 4) AS same_status,
# MAGIC        round(avg(oracle_ops), 2)                           AS oracle_ops_per_document,
# MAGIC        round(avg(model_ops), 2)                            AS model_ops_per_document
# MAGIC FROM nb_compare
# MAGIC GROUP BY oracle_version, model_version
# MAGIC ORDER BY model_version, oracle_version

# COMMAND ----------

compare = spark.table("nb_compare").toPandas()


def draw_compare(pdf, ax):
    for version, part in pdf.groupby("model_version"):
        ax.scatter(part["oracle_deletion"], part["model_deletion"], s=28, alpha=0.75, label=short(version))
    ax.plot([0, 1], [0, 1], color="#8c959f", linestyle="--", linewidth=1, label="model = oracle")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("distilled oracle: deletion ratio")
    ax.set_ylabel("refine model: deletion ratio")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="upper left")


chart("oracle_vs_model.png", compare, draw_compare, "Per document: oracle vs model", figsize=(6, 6))

# COMMAND ----------

# MAGIC %md
# MAGIC ## The documents the model and the oracle disagree on most

# COMMAND ----------

# MAGIC %sql
# MAGIC SELECT doc_id, source, model_version, oracle_status, model_status,
# MAGIC        round(oracle_deletion, 4) AS oracle_deletion, round(model_deletion, 4) AS model_deletion,
# MAGIC        round(model_deletion - oracle_deletion, 4) AS difference
# MAGIC FROM nb_compare
# MAGIC ORDER BY abs(model_deletion - oracle_deletion) DESC, doc_id
# MAGIC LIMIT 20
