"""``effllm bench``: benchmark cases for effllm's kernels and for whole models, one record schema.

Register a kernel case with ``@effllm.bench.case(name, shapes=[...], ...)`` returning a ``Setup``,
or a model case with ``@effllm.bench.model_case(name, params=[...], metrics=(...), ...)`` returning
a ``ModelSetup``; run either with ``effllm bench run NAME --out results.jsonl``. docs/benchmarks.md
describes the record schema and how to add a case.
"""

from .records import METRICS, Metric, define_metric, read_jsonl, write_jsonl
from .registry import (
           CASES,
           Case,
           ModelSetup,
           Setup,
           case,
           get_case,
           load_builtin_cases,
           model_case,
)
from .runner import run_case

__all__ = ["CASES", "METRICS", "Case", "Metric", "ModelSetup", "Setup", "case", "define_metric", "get_case",
           "load_builtin_cases", "model_case", "read_jsonl", "run_case", "write_jsonl"]
