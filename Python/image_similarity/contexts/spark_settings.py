"""The spark context's defaults, without its imports: the command line's --help reads them without loading torch or
scikit-learn (spark.py imports both)."""

DEFAULT_MASTER = "local[*]"
"""The Spark master when none is named: Spark inside this process, on every core."""
