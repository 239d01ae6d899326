"""SQL text analysis (sans-I/O): statement classification for the query cache."""

from proxy.sql.classify import (
    BUILTIN_VOLATILE_OR_STABLE,
    Classification,
    ClassificationCache,
    Status,
    NON_IMMUTABLE_CAST_TYPES,
    builtin_non_immutable,
    cache_decision,
    classify,
    fallback_provolatile,
)

__all__ = [
    "BUILTIN_VOLATILE_OR_STABLE",
    "Classification",
    "ClassificationCache",
    "Status",
    "NON_IMMUTABLE_CAST_TYPES",
    "builtin_non_immutable",
    "cache_decision",
    "classify",
    "fallback_provolatile",
]
