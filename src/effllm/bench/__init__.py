"""``effllm bench``: unit-level benchmarking of effllm's kernels and modules.

Register a case with ``@effllm.bench.case(name, shapes=[...], dtypes=(...))``; run it with
``effllm bench run NAME --refcheck --out results.jsonl``.
"""

from .registry import CASES, Case, Setup, case, get_case, load_builtin_cases
from .records import read_jsonl, write_jsonl
from .runner import run_case

__all__ = ["CASES", "Case", "Setup", "case", "get_case", "load_builtin_cases", "read_jsonl", "write_jsonl", "run_case"]
