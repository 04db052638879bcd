"""SQL shipped with refinex as package data: ``views.sql``, the views over the edit
statistics (read by ``refinex.spark.views``)."""
