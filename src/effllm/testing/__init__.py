"""Testing kit: tolerance table, reference comparisons, hypothesis strategies, real models."""

from .compare import assert_close_to_reference, assert_sqnr_at_least, sqnr_db
from .tolerances import ABS_FLOOR, ATTENTION_ERROR_RATIO, SQNR_FLOOR_DB, abs_floor

__all__ = [
    "assert_close_to_reference",
    "assert_sqnr_at_least",
    "sqnr_db",
    "ABS_FLOOR",
    "ATTENTION_ERROR_RATIO",
    "SQNR_FLOOR_DB",
    "abs_floor",
]
