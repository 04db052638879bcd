# Databricks notebook source
# MAGIC %md
# MAGIC # Model registry
# MAGIC
# MAGIC The registered versions of the refine model (`model.registered_name`, `refinex-refiner` by default):
# MAGIC their tags and validation metrics (`val_*`: program metrics on validation chunks at training time),
# MAGIC their aliases (which one is `@champion`, the version `refine` uses by default), and the edit statistics
# MAGIC of the programs each version wrote (`edit_stats` rows with `origin = 'model'` and
# MAGIC `origin_version = '<name>/<version>'`, decoding suffixes such as `+unconstrained` included), next to
# MAGIC the distilled oracle's.
# MAGIC
# MAGIC Each version also shows its latest evaluation (`refinex.eval.*` tags: snippet F1, new words, invalid
# MAGIC programs) and its last promotion decision (`refinex.promotion.*` tags). The last cell runs the gated
# MAGIC `promote` stage (the same as `refinex promote --version N`) on the version in the `promote_version`
# MAGIC widget (empty: nothing is changed): `@champion` moves only if the gates pass, else `@challenger`.
# MAGIC A non-empty `force_reason` forces the promotion and records the reason.
# MAGIC
# MAGIC **Widgets**: `workdir`, `profile`, `overrides` (as in the edit statistics notebook), `promote_version`,
# MAGIC `force_reason`.
# MAGIC Locally MLflow is `sqlite:///<workdir>/mlflow.db`; on Databricks it is what the profile says
# MAGIC (`model.tracking_uri: databricks`, `model.registry_uri: databricks-uc`: the Unity Catalog registry,
# MAGIC where the model is `<catalog>.<schema>.refinex_refiner`).

# COMMAND ----------

# DBTITLE 1,Attach to the workdir and the registry
try:
    import refinex  # noqa: F401 - installed on the cluster (the bundle's wheel) or locally
except ImportError:  # a Git folder of this repository: its root is the notebook folder's parent
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.getcwd()))

import matplotlib.pyplot as plt
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from refinex.notebook import attach, widget

ctx = attach(widget("workdir", ""), widget("profile", ""), spark=spark, overrides=widget("overrides", ""))
promote_version = widget("promote_version", "", label="promote_version (empty: none)").strip()
force_reason = widget("force_reason", "", label="force_reason (empty: gated)").strip()
name = ctx.config.model.registered_name
champion_alias = ctx.config.model.champion_alias
client = MlflowClient(tracking_uri=ctx.tracking_uri, registry_uri=ctx.registry_uri)
print(f"model {name} (alias @{champion_alias}) in {ctx.registry_uri}")

# COMMAND ----------

# DBTITLE 1,Registered versions
RUN_METRICS = ("final_train_loss", "validation_loss", "train_seconds", "steps")
COLUMNS = ["version", "aliases", "champion", "status", "created", "decision", "decision_reason", "eval_snippet_f1",
           "eval_new_words", "eval_invalid_share", "base_name", "sft_origin_version", "train_data_version",
           "origin_prefix", "run_id", "source"]


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def list_versions():
    """One row per registered version: aliases, tags, val_* metrics (tags, else the run's)."""
    try:
        aliases = client.get_registered_model(name).aliases or {}
        found = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        print(f"no registered model {name}: {str(exc).splitlines()[0]}")
        return pd.DataFrame(columns=COLUMNS)
    rows = []
    for v in sorted(found, key=lambda v: int(v.version)):
        names = sorted({a for a, target in aliases.items() if str(target) == str(v.version)} | set(v.aliases or ()))
        tags = dict(v.tags or {})
        row = {
            "version": str(v.version), "aliases": ", ".join(f"@{a}" for a in names),
            "champion": champion_alias in names, "status": v.status,
            "created": pd.to_datetime(v.creation_timestamp, unit="ms"),
            "decision": tags.get("refinex.promotion.decision"), "decision_reason": tags.get("refinex.promotion.reason"),
            "eval_snippet_f1": _number(tags.get("refinex.eval.snippet_f1")),
            "eval_new_words": _number(tags.get("refinex.eval.new_words")),
            "eval_invalid_share": _number(tags.get("refinex.eval.invalid_share")),
            "base_name": tags.get("base_name"), "sft_origin_version": tags.get("sft_origin_version"),
            "train_data_version": tags.get("train_data_version"), "origin_prefix": f"{name}/{v.version}",
            "run_id": v.run_id, "source": v.source,
        }
        metrics = {}
        if v.run_id:
            try:
                metrics = client.get_run(v.run_id).data.metrics
            except MlflowException:
                pass
        for key in sorted({*tags, *metrics}):
            if key.startswith("val_"):
                value = tags.get(key, metrics.get(key))
                row[key] = float(value) if value not in (None, "") else None
        for key in RUN_METRICS:
            value = metrics.get(key, tags.get(key))
            row[key] = float(value) if value not in (None, "") else None
        rows.append(row)
    return pd.DataFrame(rows, columns=list(dict.fromkeys([*COLUMNS, *(k for r in rows for k in r)])))


def register_view(versions):
    """``model_versions``: the listing as a temp view, for SQL."""
    schema = "version string, aliases string, champion boolean, origin_prefix string"
    records = versions[["version", "aliases", "champion", "origin_prefix"]].to_dict("records")
    spark.createDataFrame([tuple(r.values()) for r in records], schema).createOrReplaceTempView("model_versions")


versions = list_versions()
register_view(versions)
champion = next(iter(versions.loc[versions["champion"], "version"]), None) if len(versions) else None
print(f"{len(versions)} version(s); @{champion_alias}: {champion or 'not set'}")
display(versions.drop(columns=["run_id", "source"]))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Edit statistics of each version's programs
# MAGIC One row per version and `origin_version` (a version refined with other decoding settings has several),
# MAGIC then the distilled oracle's programs for comparison. Versions that never refined anything have empty
# MAGIC statistics.

# COMMAND ----------

# MAGIC %sql
# MAGIC CREATE OR REPLACE TEMP VIEW nb_version_stats AS
# MAGIC SELECT v.version, v.aliases, v.champion,
# MAGIC        coalesce(e.origin_version, v.origin_prefix)            AS origin_version,
# MAGIC        count(e.doc_id)                                         AS documents,
# MAGIC        avg(e.deletion_ratio)                                   AS mean_deletion_ratio,
# MAGIC        sum(e.chars_removed) / nullif(sum(e.chars_in), 0)       AS corpus_deletion_ratio,
# MAGIC        avg(e.ops_total)                                        AS ops_per_document,
# MAGIC        sum(e.ops_rejected)                                     AS ops_rejected,
# MAGIC        sum(e.parse_errors)                                     AS parse_errors,
# MAGIC        count_if(e.status = 'refined')                          AS refined,
# MAGIC        count_if(e.status = 'unchanged')                        AS unchanged,
# MAGIC        count_if(e.status = 'dropped')                          AS dropped,
# MAGIC        count_if(e.status = 'fallback_raw')                     AS fallback_raw
# MAGIC FROM model_versions v
# MAGIC LEFT JOIN edit_stats e
# MAGIC   ON e.origin = 'model'
# MAGIC  AND (e.origin_version = v.origin_prefix OR startswith(e.origin_version, concat(v.origin_prefix, '+')))
# MAGIC GROUP BY v.version, v.aliases, v.champion, coalesce(e.origin_version, v.origin_prefix);
# MAGIC
# MAGIC SELECT version, aliases, origin_version, documents,
# MAGIC        round(mean_deletion_ratio, 4) AS mean_deletion_ratio, round(corpus_deletion_ratio, 4) AS corpus_deletion_ratio,
# MAGIC        round(ops_per_document, 2) AS ops_per_document, ops_rejected, parse_errors,
# MAGIC        refined, unchanged, dropped, fallback_raw
# MAGIC FROM nb_version_stats
# MAGIC UNION ALL
# MAGIC SELECT 'oracle', 'distilled', origin_version, count(*),
# MAGIC        round(avg(deletion_ratio), 4), round(sum(chars_removed) / nullif(sum(chars_in), 0), 4),
# MAGIC        round(avg(ops_total), 2), sum(ops_rejected), sum(parse_errors),
# MAGIC        count_if(status = 'refined'), count_if(status = 'unchanged'), count_if(status = 'dropped'),
# MAGIC        count_if(status = 'fallback_raw')
# MAGIC FROM edit_stats
# MAGIC WHERE origin = 'distilled'
# MAGIC GROUP BY origin_version

# COMMAND ----------

version_stats = spark.table("nb_version_stats").toPandas()
oracle = spark.sql(
    "SELECT avg(deletion_ratio) AS r FROM edit_stats WHERE origin = 'distilled'").first()["r"]
val_columns = [c for c in versions.columns if c.startswith("val_")]
fig, axes = plt.subplots(1, 2 if val_columns else 1, figsize=(12 if val_columns else 7, 4), squeeze=False)
ax = axes[0][0]
if version_stats.empty:
    ax.text(0.5, 0.5, "no registered versions", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
else:
    stats = version_stats.assign(_v=version_stats["version"].astype(int)).sort_values(["_v", "origin_version"])
    labels = [f"v{v}{' @' + champion_alias if c else ''}" + (o[len(f'{name}/{v}'):] or "")
              for v, c, o in zip(stats["version"], stats["champion"], stats["origin_version"])]
    bars = ax.bar(labels, stats["mean_deletion_ratio"].fillna(0),
                  color=["#1f6feb" if c else "#8c959f" for c in stats["champion"]])
    ax.bar_label(bars, labels=[f"{r:.3f}\n{int(d)} docs" if d else "not used" for r, d in
                               zip(stats["mean_deletion_ratio"].fillna(0), stats["documents"])], fontsize=8)
    if oracle is not None:
        ax.axhline(oracle, color="#cf222e", linestyle="--", linewidth=1, label=f"distilled oracle {oracle:.3f}")
        ax.legend(fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean deletion ratio of its programs")
ax.set_title(f"{name}: versions")
if val_columns:
    ax = axes[0][1]
    table = versions.set_index("version")[val_columns].astype(float)
    table.plot.bar(ax=ax, rot=0, width=0.8)
    ax.set_ylim(0, 1)
    ax.set_title("validation metrics (val_*)")
    ax.legend(fontsize=7)
fig.tight_layout()
ctx.show(fig, "model_versions.png")
plt.close(fig)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Promote a version (gated)
# MAGIC Set the `promote_version` widget to a version number and run this cell. The version's latest evaluation
# MAGIC goes through the promotion gates (`promote:` in the profile: no new words, invalid programs at most 1 %,
# MAGIC snippet recall not below the raw text's minus a margin, a better snippet F1 than the champion's): passing,
# MAGIC `@champion` points at it (`models:/refinex-refiner@champion`, what the next `refinex refine` uses);
# MAGIC failing, `@challenger` does and the reason is printed. `force_reason` promotes anyway, recorded.
# MAGIC Empty `promote_version`: nothing is changed.

# COMMAND ----------

# DBTITLE 1,Promote
promotion = None
if promote_version:
    from refinex.spark.promote import format_decision
    from refinex.spark.registry import run_stage

    promotion = run_stage("promote", ctx.spark, ctx.config, ctx.workdir, version=int(promote_version),
                          force=bool(force_reason), reason=force_reason or None)
    print(format_decision(promotion))
    versions = list_versions()
    register_view(versions)
    display(versions[["version", "aliases", "champion", "decision", "decision_reason", "status", "created"]])
else:
    print("promote_version is empty: @" + champion_alias + " is left as it is (version "
          + str(champion or "not set") + ")")
