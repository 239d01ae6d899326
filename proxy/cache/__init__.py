"""The query cache: results store (store.py), origin catalog and per-statement decisions
(catalog.py), per-config metrics (metrics.py)."""
