-- refinex: SQL views over the edit statistics (Databricks SQL and Spark SQL).
--
-- ${schema} stands for the schema of the refinex tables, e.g. main.refinex on Unity Catalog;
-- the views are created beside them. refinex.spark.views reads this file: register_views()
-- creates the same views as session views locally, views_sql(schema) returns it rendered.
--
-- Every view shows the latest version of each origin: the version whose edit_stats rows were
-- written last (max(created_at) per origin, see edit_stats_versions). Each carries origin,
-- origin_version and version_label (the short label of refinex.versions.version_label, e.g.
-- trafilatura@4f778c), so `WHERE version_label = '...'` picks one origin's version.

-- One row per origin and version in edit_stats; is_latest marks the version the views show.
CREATE OR REPLACE VIEW ${schema}.edit_stats_versions AS
SELECT origin,
       origin_version,
       concat(CASE WHEN regexp_extract(origin_version, '([A-Za-z0-9_-]+(/[0-9]+)?)([:\\[+]|$)', 1) = '' THEN 'v' ELSE regexp_extract(origin_version, '([A-Za-z0-9_-]+(/[0-9]+)?)([:\\[+]|$)', 1) END, '@', substr(sha1(CAST(origin_version AS BINARY)), 1, 6)) AS version_label,
       count(*)        AS documents,
       min(created_at) AS first_created_at,
       max(created_at) AS created_at,
       row_number() OVER (PARTITION BY origin ORDER BY max(created_at) DESC, origin_version DESC) = 1 AS is_latest
FROM ${schema}.edit_stats
GROUP BY origin, origin_version;

-- edit_stats at the latest version of each origin (one row per document and origin).
CREATE OR REPLACE VIEW ${schema}.edit_stats_latest AS
SELECT e.doc_id, e.origin, e.origin_version, v.version_label, e.run_id, e.source, e.shard, e.status,
       e.chars_in, e.chars_out, e.chars_removed, e.lines_in, e.lines_out, e.lines_removed,
       e.ops_total, e.ops_applied, e.ops_rejected, e.n_remove_lines, e.n_remove_str, e.n_keep_all,
       e.parse_errors, e.rejected_by_reason, e.deletion_ratio, e.created_at
FROM ${schema}.edit_stats e
JOIN ${schema}.edit_stats_versions v ON e.origin = v.origin AND e.origin_version = v.origin_version
WHERE v.is_latest;

-- One row per origin: documents, deletion (mean per document and over the corpus), statuses.
CREATE OR REPLACE VIEW ${schema}.stats_by_origin AS
SELECT origin, origin_version, version_label,
       count(*)                                       AS documents,
       avg(deletion_ratio)                            AS mean_deletion_ratio,
       sum(chars_removed) / nullif(sum(chars_in), 0)  AS corpus_deletion_ratio,
       sum(chars_in)                                  AS chars_in,
       sum(chars_out)                                 AS chars_out,
       avg(ops_total)                                 AS ops_per_document,
       sum(ops_rejected)                              AS ops_rejected,
       sum(parse_errors)                              AS parse_errors,
       count_if(status = 'refined')                   AS refined,
       count_if(status = 'unchanged')                 AS unchanged,
       count_if(status = 'dropped')                   AS dropped,
       count_if(status = 'fallback_raw')              AS fallback_raw,
       count_if(status NOT IN ('refined', 'unchanged', 'dropped', 'fallback_raw')) AS other_status
FROM ${schema}.edit_stats_latest
GROUP BY origin, origin_version, version_label;

-- Deletion ratio by document source (documents that have a program).
CREATE OR REPLACE VIEW ${schema}.stats_by_source AS
SELECT coalesce(source, '(none)') AS source, origin, origin_version, version_label,
       count(*)                                       AS documents,
       avg(deletion_ratio)                            AS mean_deletion_ratio,
       percentile_approx(deletion_ratio, 0.5)         AS median_deletion_ratio,
       percentile_approx(deletion_ratio, 0.9)         AS p90_deletion_ratio,
       sum(chars_removed) / nullif(sum(chars_in), 0)  AS corpus_deletion_ratio,
       sum(chars_in)                                  AS chars_in,
       sum(chars_removed)                             AS chars_removed
FROM ${schema}.edit_stats_latest
WHERE deletion_ratio IS NOT NULL
GROUP BY coalesce(source, '(none)'), origin, origin_version, version_label;

-- Documents per status (refined, unchanged, dropped, fallback_raw, expert_failed, no_program).
CREATE OR REPLACE VIEW ${schema}.stats_by_status AS
SELECT origin, origin_version, version_label, status,
       count(*)                                                            AS documents,
       count(*) / sum(count(*)) OVER (PARTITION BY origin, origin_version) AS share,
       avg(deletion_ratio)                                                 AS mean_deletion_ratio,
       sum(chars_removed)                                                  AS chars_removed
FROM ${schema}.edit_stats_latest
GROUP BY origin, origin_version, version_label, status;

-- Deletion ratio by shard (documents that have a program).
CREATE OR REPLACE VIEW ${schema}.stats_by_shard AS
SELECT shard, origin, origin_version, version_label,
       count(*)                                       AS documents,
       avg(deletion_ratio)                            AS mean_deletion_ratio,
       sum(chars_removed) / nullif(sum(chars_in), 0)  AS corpus_deletion_ratio
FROM ${schema}.edit_stats_latest
WHERE deletion_ratio IS NOT NULL
GROUP BY shard, origin, origin_version, version_label;

-- Histogram of operations per program: how many documents have n_ops operations of each kind.
CREATE OR REPLACE VIEW ${schema}.ops_per_document AS
SELECT origin, origin_version, version_label, op, n_ops, count(*) AS documents
FROM (
  SELECT origin, origin_version, version_label,
         stack(3, 'ops_total', ops_total, 'remove_lines', n_remove_lines, 'remove_str', n_remove_str) AS (op, n_ops)
  FROM ${schema}.edit_stats_latest
  WHERE ops_total IS NOT NULL
) AS ops
GROUP BY origin, origin_version, version_label, op, n_ops;

-- Deletion ratio percentiles per origin (documents that have a program).
CREATE OR REPLACE VIEW ${schema}.deletion_ratio_percentiles AS
SELECT origin, origin_version, version_label, documents, mean_deletion_ratio,
       min_deletion_ratio,
       quantiles[0] AS p10, quantiles[1] AS p50, quantiles[2] AS p90, quantiles[3] AS p99,
       max_deletion_ratio
FROM (
  SELECT origin, origin_version, version_label,
         count(*)                                                         AS documents,
         avg(deletion_ratio)                                              AS mean_deletion_ratio,
         min(deletion_ratio)                                              AS min_deletion_ratio,
         max(deletion_ratio)                                              AS max_deletion_ratio,
         percentile_approx(deletion_ratio, array(0.1, 0.5, 0.9, 0.99))   AS quantiles
  FROM ${schema}.edit_stats_latest
  WHERE deletion_ratio IS NOT NULL
  GROUP BY origin, origin_version, version_label
) AS q;

-- The strings remove_str operations delete, by frequency (every operation of the programs,
-- accepted or not). Program lines are parsed with regular expressions: the canonical form
-- remove_str(<line>, "<text>") (optionally line=/text= keywords, single quotes, a trailing
-- comma or semicolon), string escapes decoded as refinex.program.parse does. The literal's
-- pattern uses possessive quantifiers (++, *+): Java's regex engine then matches it in one
-- pass, without the recursion that overflows the stack on strings of a few thousand characters.
CREATE OR REPLACE VIEW ${schema}.top_removed_strings AS
WITH program_lines AS (
  SELECT p.origin, p.origin_version, v.version_label, p.doc_id, explode(split(p.program, '\n')) AS op
  FROM ${schema}.programs p
  JOIN ${schema}.edit_stats_versions v
    ON p.origin = v.origin AND p.origin_version = v.origin_version AND v.is_latest
), literals AS (
  SELECT origin, origin_version, version_label, doc_id,
         regexp_extract(op, r'^\s*remove_str\s*\(\s*(?:line\s*=\s*)?[0-9]+\s*,\s*(?:text\s*=\s*)?("(?:[^"\\]++|\\(?:[\\"\x27ntr]|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}))*+"|\x27(?:[^\x27\\]++|\\(?:[\\"\x27ntr]|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}))*+\x27)\s*,?\s*\)\s*;?\s*\z', 1) AS literal
  FROM program_lines
), tokens AS (
  -- The literal's body as runs of plain text and single escapes (a surrogate pair is one).
  SELECT origin, origin_version, version_label, doc_id,
         regexp_extract_all(substr(literal, 2, length(literal) - 2),
                            r'(\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|\\U[0-9a-fA-F]{8}|\\.|[^\\]+)', 1) AS pieces
  FROM literals
  WHERE literal <> ''
), decoded AS (
  SELECT origin, origin_version, version_label, doc_id,
         array_join(transform(pieces, piece -> CASE
           WHEN left(piece, 1) <> '\\' THEN piece
           WHEN piece = '\\n' THEN '\n'
           WHEN piece = '\\t' THEN '\t'
           WHEN piece = '\\r' THEN '\r'
           WHEN length(piece) = 2 THEN substr(piece, 2)
           -- \uXXXX, \UXXXXXXXX or a \uD8xx\uDCxx pair: the code point, as UTF-8 bytes
           ELSE element_at(transform(transform(array(
                  CASE WHEN length(piece) = 12
                       THEN 65536 + (CAST(conv(substr(piece, 3, 4), 16, 10) AS BIGINT) - 55296) * 1024
                            + CAST(conv(substr(piece, 9, 4), 16, 10) AS BIGINT) - 56320
                       ELSE CAST(conv(substr(piece, 3), 16, 10) AS BIGINT) END),
                  point -> CASE WHEN point BETWEEN 55296 AND 57343 OR point > 1114111 THEN 65533 ELSE point END),
                  c -> decode(unhex(CASE
                    WHEN c < 128 THEN lpad(hex(c), 2, '0')
                    WHEN c < 2048 THEN concat(hex(192 + shiftright(c, 6)), hex(128 + (c & 63)))
                    WHEN c < 65536 THEN concat(hex(224 + shiftright(c, 12)), hex(128 + (shiftright(c, 6) & 63)),
                                               hex(128 + (c & 63)))
                    ELSE concat(hex(240 + shiftright(c, 18)), hex(128 + (shiftright(c, 12) & 63)),
                                hex(128 + (shiftright(c, 6) & 63)), hex(128 + (c & 63))) END), 'UTF-8')), 1)
           END), '') AS string
  FROM tokens
)
SELECT origin, origin_version, version_label,
       row_number() OVER (PARTITION BY origin, origin_version ORDER BY count(*) DESC, string) AS rank,
       string,
       count(*)                AS times,
       count(DISTINCT doc_id)  AS documents
FROM decoded
GROUP BY origin, origin_version, version_label, string;

-- The whole lines the programs' accepted remove_lines delete (execution semantics: in order,
-- a range is accepted when it is within the document and overlaps no accepted range), by the
-- number of documents they are removed from; surrounding whitespace trimmed, blank lines left out.
CREATE OR REPLACE VIEW ${schema}.top_removed_lines AS
WITH ranged AS (
  SELECT p.origin, p.origin_version, v.version_label, p.doc_id, split(d.text, '\n') AS lines,
         transform(
           filter(split(p.program, '\n'),
                  op -> op RLIKE r'^\s*remove_lines\s*\(\s*(?:start\s*=\s*)?[0-9]+\s*,\s*(?:end\s*=\s*)?[0-9]+\s*,?\s*\)\s*;?\s*\z'),
           op -> named_struct(
             'first_line', try_cast(regexp_extract(op, r'^\s*remove_lines\s*\(\s*(?:start\s*=\s*)?([0-9]+)\s*,\s*(?:end\s*=\s*)?([0-9]+)', 1) AS BIGINT),
             'last_line', try_cast(regexp_extract(op, r'^\s*remove_lines\s*\(\s*(?:start\s*=\s*)?([0-9]+)\s*,\s*(?:end\s*=\s*)?([0-9]+)', 2) AS BIGINT))) AS ranges
  FROM ${schema}.programs p
  JOIN ${schema}.edit_stats_versions v
    ON p.origin = v.origin AND p.origin_version = v.origin_version AND v.is_latest
  JOIN ${schema}.documents d ON d.doc_id = p.doc_id
), accepted AS (
  SELECT origin, origin_version, version_label, doc_id, lines,
         aggregate(ranges, CAST(array() AS ARRAY<STRUCT<first_line: BIGINT, last_line: BIGINT>>),
                   (kept, r) -> IF(r.first_line IS NOT NULL AND r.last_line IS NOT NULL
                                   AND r.first_line <= r.last_line AND r.last_line < size(lines)
                                   AND NOT exists(kept, k -> k.first_line <= r.last_line AND r.first_line <= k.last_line),
                                   concat(kept, array(r)), kept)) AS ranges
  FROM ranged
), removed AS (
  SELECT origin, origin_version, version_label, doc_id,
         explode(flatten(transform(ranges, r -> slice(lines, CAST(r.first_line + 1 AS INT),
                                                      CAST(r.last_line - r.first_line + 1 AS INT))))) AS line
  FROM accepted
), trimmed AS (
  SELECT origin, origin_version, version_label, doc_id, regexp_replace(line, r'^\s+|\s+\z', '') AS line
  FROM removed
)
SELECT origin, origin_version, version_label,
       row_number() OVER (PARTITION BY origin, origin_version
                          ORDER BY count(DISTINCT doc_id) DESC, count(*) DESC, line) AS rank,
       line,
       count(*)                AS times,
       count(DISTINCT doc_id)  AS documents
FROM trimmed
WHERE line <> ''
GROUP BY origin, origin_version, version_label, line;

-- Per document: the distilled oracle against the refine model (documents with both, latest
-- versions). origin, origin_version and version_label are the model's.
CREATE OR REPLACE VIEW ${schema}.model_vs_oracle AS
SELECT m.doc_id,
       coalesce(m.source, o.source)          AS source,
       m.origin,
       m.origin_version,
       m.version_label,
       o.origin_version                      AS oracle_version,
       o.version_label                       AS oracle_version_label,
       o.status                              AS oracle_status,
       m.status                              AS model_status,
       o.status = m.status                   AS same_status,
       o.deletion_ratio                      AS oracle_deletion_ratio,
       m.deletion_ratio                      AS model_deletion_ratio,
       m.deletion_ratio - o.deletion_ratio   AS deletion_ratio_difference,
       coalesce(o.chars_in, m.chars_in)      AS chars_in,
       o.chars_out                           AS oracle_chars_out,
       m.chars_out                           AS model_chars_out,
       o.ops_total                           AS oracle_ops,
       m.ops_total                           AS model_ops,
       o.lines_removed                       AS oracle_lines_removed,
       m.lines_removed                       AS model_lines_removed
FROM ${schema}.edit_stats_latest o
JOIN ${schema}.edit_stats_latest m ON o.doc_id = m.doc_id
WHERE o.origin = 'distilled' AND m.origin = 'model';
