"""Fused CPU loops, built on first use: attention over quantized KV codes, NSNQuant's encoder, a
decode step over a ragged layer's float32 rows, and the explicit softmax's per-row pass.

torch has no single op for "sum table entries picked by byte codes" or "add codebook vectors
weighted per token": the torch path (``kv/codes_attention.py``) spells them as ``gather`` and
``scatter_add_`` over int64 indices, several passes over memory per decode step. ``codes.c`` does
each in one loop over the codes as stored (uint8), so a decode step reads the codes once. Its
``nsn_encode`` picks NSNQuant's two-stage codes in one pass per sub-vector, where the torch ops
(``codebook.encode``) materialise every (candidate, vector) score. Its ``softmax_rows`` does
``kernels/scores.py``'s masking, softmax, log-sum-exp and per-key attention mass / peak in one
pass per row, where the torch ops make five or more passes over every chunk of logits.

The library is compiled with the system C compiler (``$CC``, else ``cc``) the first time one of
them runs on CPU, into ``$EFFLLM_CACHE/native`` (default ``~/.cache/effllm/native``) under a name
that hashes the source, the flags and the CPU capability, and loaded with ``ctypes``: no torch
headers, so the build takes about a second. Where no compiler works the torch path runs instead
(``available()`` says which, ``why_unavailable()`` why); ``EFFLLM_NATIVE=0`` turns it off.
Nothing is built or loaded at import time.

It is built with OpenMP where the compiler takes ``-fopenmp`` (``openmp()`` says whether): with
``torch.get_num_threads()`` above 1, each head's tokens are cut into as many ranges as there are
threads with ``TOKENS_PER_THREAD`` (head, token) pairs each (at most the thread count; at least 2,
else the call runs serially), and the (head, range) items shared by the threads of an OpenMP team.
With torch's CPU wheels (their bundled ``libgomp.so.1``, loaded by ``import torch``, has the name
the library links) that is torch's own team, so a decode step's attention uses the threads the
rest of the step uses; where torch ships another OpenMP runtime (or a hashed libgomp name), or the
compiler is clang with libomp, the loops get a second pool of their own. Without OpenMP the loops
run on the calling thread.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import torch

MAX_ROWS = 64  # query rows of one head group per call (codes.c's accumulators)
MAX_DIM = 256
MAX_SLOTS = 512
MAX_BOOK = 256  # codebook vectors nsn_encode takes
MAX_BEAM = 8
# (head, token) pairs a thread takes at the least: fewer cost more to share than they save
TOKENS_PER_THREAD = 1024

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "nsn_scores": [_P, _P, _P, _P, _P, _P, _P, _I, _P, _F, _P] + [_I] * 9 + [_P],
    "nsn_values": [_P, _I, _P, _P, _P, _P, _I, _P, _F, _P, _P] + [_I] * 7 + [_P],
    "kivi_key_scores": [_P, _P, _P, _P, _P] + [_I] * 8 + [_P],
    "kivi_values": [_P, _I, _P, _P, _P, _P] + [_I] * 7 + [_P],
    "nsn_encode": [_P, _P, _P, _P, _F] + [_I] * 4 + [_P],
    "rows_decode": [_P] * 5 + [_I] * 5 + [_F, _F, _P, _I, _P, _P, _I],
    "softmax_rows": [_P] + [_I] * 8 + [_P, _P, _I, _P, _P, _I, _P, _P, _P, _I],
}


def enabled() -> bool:
    """False when ``EFFLLM_NATIVE`` is set to ``0`` / ``false`` / ``no`` / ``off``."""
    return os.environ.get("EFFLLM_NATIVE", "1").strip().lower() not in {"0", "false", "no", "off"}


def _flags() -> list[str]:
    flags = ["-O3", "-std=c11", "-shared", "-fPIC", "-fno-math-errno"]
    # AVX2 + FMA only where torch itself dispatches to them; the library is built on the machine
    # that runs it, and its name carries the capability, so another CPU builds its own.
    if platform.machine().lower() in {"x86_64", "amd64"} and torch.backends.cpu.get_cpu_capability() in {"AVX2", "AVX512"}:
        flags += ["-mavx2", "-mfma"]
    return flags


def _cache_dir() -> Path:
    """``$EFFLLM_CACHE/native``: the same root as the converted models (``testing/models.py``)."""
    return Path(os.environ.get("EFFLLM_CACHE") or Path.home() / ".cache" / "effllm") / "native"


def _build() -> ctypes.CDLL:
    """With OpenMP where the compiler takes it (gcc; clang needs libomp), else without."""
    try:
        return _build_with(_flags() + ["-fopenmp"])
    except RuntimeError as with_openmp:
        try:
            return _build_with(_flags())
        except RuntimeError as without:
            raise without from with_openmp


def _build_with(flags: list[str]) -> ctypes.CDLL:
    source = resources.files(__package__).joinpath("codes.c").read_bytes()
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler: {compiler!r} is not on PATH (set CC)")
    key = hashlib.sha256(source + " ".join([compiler, *flags, torch.backends.cpu.get_cpu_capability()]).encode())
    target = _cache_dir() / f"codes-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "codes.c", Path(tmp) / "codes.so"
            src.write_bytes(source)
            result = subprocess.run([compiler, *flags, "-o", str(out), str(src), "-lm"], capture_output=True, text=True,
                                    timeout=120, check=False)
            if result.returncode:
                raise RuntimeError(f"{compiler} failed ({result.returncode}): {result.stderr.strip()[-800:]}")
            os.replace(out, target)  # atomic: a concurrent build never leaves half a file
    lib = ctypes.CDLL(str(target))
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    lib.built_with_openmp.argtypes, lib.built_with_openmp.restype = [], ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    try:
        return _build(), ""
    except Exception as exc:  # noqa: BLE001 - any failure means "use the torch path", said once
        reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"effllm.native: the fused CPU loops are unavailable ({reason}); "
                      "the slower torch path runs instead", RuntimeWarning, stacklevel=3)
        return None, reason


def library() -> ctypes.CDLL | None:
    """The loaded library (building it on first call), or None where it is off or cannot build."""
    return _load()[0] if enabled() else None


def available() -> bool:
    """True when CPU decode steps over KV codes run the fused loops."""
    return library() is not None


def why_unavailable() -> str:
    """Why ``available()`` is False ("" when it is True)."""
    if not enabled():
        return "EFFLLM_NATIVE is off"
    return _load()[1]


def openmp() -> bool:
    """True when the loaded loops were built with OpenMP (they then share torch's threads)."""
    lib = library()
    return lib is not None and bool(lib.built_with_openmp())


def parts(heads: int, tokens: int) -> int:
    """Ranges each head's work is cut into, one thread each: torch's thread count, fewer where a
    thread would get under ``TOKENS_PER_THREAD`` (head, token) pairs; 1 (serial) below 2 or
    without OpenMP (where the ranges would only run one after another)."""
    count = min(torch.get_num_threads(), heads * tokens // TOKENS_PER_THREAD)
    return count if count > 1 and openmp() else 1


def usable(*tensors: torch.Tensor, rows: int) -> bool:
    """True when the loops apply: CPU tensors, at most ``MAX_ROWS`` query rows a head group, and
    the library loads."""
    return rows <= MAX_ROWS and all(t.device.type == "cpu" for t in tensors) and library() is not None


def _ptr(tensor: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if tensor is None else ctypes.c_void_p(tensor.data_ptr())


def _expect(name: str, tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != shape or not tensor.is_contiguous():
        raise ValueError(f"native: {name} must be a contiguous {dtype} tensor of shape {shape}, got "
                         f"{tensor.dtype} {tuple(tensor.shape)} (contiguous: {tensor.is_contiguous()})")


def _expect_rows(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    """float32 ``(BH, R, T)`` whose last dim is contiguous (a slice of a wider buffer is fine)."""
    if (tensor.dtype != torch.float32 or tuple(tensor.shape) != shape or tensor.stride(-1) != 1
            or tensor.stride(-2) < shape[-1] or tensor.stride(0) != shape[1] * tensor.stride(-2)):
        raise ValueError(f"native: {name} must be float32 {shape} with unit stride in its last dim, got "
                         f"{tensor.dtype} {tuple(tensor.shape)} strides {tensor.stride()}")


def _expect_chunks(codes: torch.Tensor, scales: torch.Tensor, grid: torch.Tensor, counts: torch.Tensor | None,
                   shape: tuple[int, int, int]) -> None:
    bh, tokens, chunks = shape
    _expect("codes", codes, torch.uint8, (bh, tokens, codes.shape[-1]))
    _expect("scales", scales, torch.uint8, (bh, tokens, 2))
    _expect("grid", grid, torch.float32, (bh, chunks, 4))
    if counts is not None:
        _expect("counts", counts, torch.int32, (bh, chunks))


class _RowTable:
    """A table of each row's tensor addresses and sizes, one int64 row of ``columns`` a row
    (``_entry`` checks and lays out one row; column ``tokens_column`` its token count), for
    rows held in tensors of their own; the tensors are kept alive with the table."""

    columns: int
    tokens_column: int

    def __init__(self, rows: list):
        self._alive = list(rows)
        self.table = torch.tensor([self._entry(index, row) for index, row in enumerate(rows)],
                                  dtype=torch.int64).reshape(len(rows), self.columns)
        self._sizes()

    def replace(self, index: int, row) -> None:
        """Row ``index`` now reads ``row`` (as in the constructor): one table entry rewritten, so
        a step in which a few rows' codes changed (a flush) rewrites only theirs."""
        entry = self._entry(index, row)  # checked before anything changes
        self.table[index] = torch.tensor(entry, dtype=torch.int64)
        self._alive[index] = row
        self._sizes()

    def _entry(self, index: int, row) -> list[int]:
        raise NotImplementedError

    def _sizes(self) -> None:
        tokens = self.table[:, self.tokens_column]
        self.tokens = int(tokens.max()) if len(tokens) else 0  # the longest row
        self.total = int(tokens.sum())


class RowCodes(_RowTable):
    """NSNQuant codes of rows of different lengths, each row in tensors of its own (a store per
    row: ``kv/quantized_rows.py``), as the loops take them: a table of each row's addresses and
    sizes, so no row is copied or padded. ``rows`` is a list of ``(codes (T, slots) uint8, scales
    (T, 2) uint8, grid (C, 4) float32, counts (C,) int32 or None)`` contiguous tensors, or None
    for a row with no codes; the tensors are kept alive with the table."""

    columns, tokens_column = 6, 4

    def __init__(self, rows: list, *, slots: int):
        self.slots = slots
        super().__init__(rows)

    def _entry(self, index: int, row) -> list[int]:
        if row is None:
            return [0] * self.columns
        codes, scales, grid, counts = row
        tokens, chunks = codes.shape[0], grid.shape[0]
        where = f"rows[{index}]"
        _expect(f"{where} codes", codes, torch.uint8, (tokens, self.slots))
        _expect(f"{where} scales", scales, torch.uint8, (tokens, 2))
        _expect(f"{where} grid", grid, torch.float32, (chunks, 4))
        if counts is not None:
            _expect(f"{where} counts", counts, torch.int32, (chunks,))
            if int(counts.sum()) != tokens:
                raise ValueError(f"native.RowCodes: {where} counts add up to {int(counts.sum())}, not its "
                                 f"{tokens} tokens")
        return [codes.data_ptr(), scales.data_ptr(), grid.data_ptr(),
                0 if counts is None else counts.data_ptr(), tokens, chunks]

    def _sizes(self) -> None:
        super()._sizes()
        self.chunks = int(self.table[:, 5].max()) if len(self.table) else 0


def nsn_scores(rotated: torch.Tensor, vectors: torch.Tensor, codes: torch.Tensor | RowCodes,
               scales: torch.Tensor | None, grid: torch.Tensor | None, counts: torch.Tensor | None, chunk_len: int,
               qmu: torch.Tensor, beta: float, out: torch.Tensor) -> torch.Tensor:
    """Writes ``out (BH, R, T)``: each coded token's dot product with each query row.

    ``rotated (BH, R, D)`` float32: the query rows after the Hadamard rotation; ``vectors (K, 8)``
    the codebook (the per-row lookup tables are built inside); ``codes (BH, T, stages * D / 8)``
    uint8 (one index a byte, stage-major); ``scales (BH, T, 2)`` uint8 and ``grid (BH, C, 4)``
    float32 (``NSNCodes``' log-coded token scales); ``counts (BH, C)`` int32 tokens per chunk, or
    None for ``chunk_len`` each; ``qmu (BH, R, C)`` float32 query-shift dots; stage 2 counts
    ``beta`` times. ``codes`` may instead be a ``RowCodes`` of BH rows (``scales``, ``grid``,
    ``counts`` None): ``C`` and ``T`` are then its most chunks and tokens, and only each row's
    first columns of ``out`` are written."""
    bh, rows, dim = rotated.shape
    each = codes if isinstance(codes, RowCodes) else None
    if each is not None:
        tokens, slots, total = each.tokens, each.slots, each.total
        if len(each.table) != bh:
            raise ValueError(f"native.nsn_scores: {len(each.table)} rows of codes for {bh} heads of queries")
    else:
        tokens, slots = codes.shape[1], codes.shape[-1]
        total = bh * tokens
    chunks, book = each.chunks if each is not None else qmu.shape[2], vectors.shape[0]
    subs = dim // 8
    _expect("rotated", rotated, torch.float32, (bh, rows, dim))
    _expect("vectors", vectors, torch.float32, (book, 8))
    if each is None:
        _expect_chunks(codes, scales, grid, counts, (bh, tokens, chunks))
    _expect("qmu", qmu, torch.float32, (bh, rows, chunks))
    _expect_rows("out", out, (bh, rows, tokens))
    if rows > MAX_ROWS or dim % 8 or dim > MAX_DIM or slots not in (subs, 2 * subs) or book > 256:
        raise ValueError(f"native.nsn_scores: at most {MAX_ROWS} rows, D a multiple of 8 up to {MAX_DIM}, 1-2 "
                         f"stages of D / 8 codes below 256; got {rows} rows, D={dim}, {slots} codes a token, "
                         f"{book} vectors")
    padded = (rows + 3) // 4 * 4
    count = parts(1, total)
    scratch = rotated.new_empty(count, subs * book * padded)  # each thread's lookup tables
    arrays = (None,) * 4 if each is not None else (codes, scales, grid, counts)
    library().nsn_scores(_ptr(rotated), _ptr(vectors), _ptr(scratch), *map(_ptr, arrays), max(chunk_len, 1),
                         _ptr(qmu), float(beta), _ptr(out), out.stride(-2), bh, rows, tokens, slots // subs, subs,
                         book, chunks, count, _ptr(None if each is None else each.table))
    return out


def nsn_values(weights: torch.Tensor, codes: torch.Tensor | RowCodes, scales: torch.Tensor | None,
               grid: torch.Tensor | None, counts: torch.Tensor | None, chunk_len: int, vectors: torch.Tensor,
               beta: float, stages: int, *, by_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (BH, R, subs * 8), chunk_w (BH, R, C))`` float32 from attention ``weights (BH, R, T)``
    over 8-dim sub-vector codes (arguments as ``nsn_scores``; ``vectors (K, 8)`` the codebook):
    the weighted codebook sum in the rotated domain, and each chunk's ``sum w * b`` (to
    multiply by the chunk shifts). ``by_range``: ``out`` per range of chunks, ``(parts, BH, R,
    subs * 8)``, not yet added (to test that each range keeps its own sum). ``codes`` may be a
    ``RowCodes`` of BH rows, as in ``nsn_scores`` (``weights``' first columns of each row read;
    ``chunk_w`` as wide as its most chunks, zero past a row's own)."""
    bh, rows, tokens = weights.shape
    each = codes if isinstance(codes, RowCodes) else None
    if each is not None:
        slots, chunks, total = each.slots, each.chunks, each.total
        if len(each.table) != bh or each.tokens > tokens:
            raise ValueError(f"native.nsn_values: {len(each.table)} rows of codes of up to {each.tokens} tokens "
                             f"for weights {tuple(weights.shape)}")
    else:
        slots, chunks, total = codes.shape[-1], grid.shape[1], bh * tokens
        _expect_chunks(codes, scales, grid, counts, (bh, tokens, chunks))
    subs = slots // stages
    _expect_rows("weights", weights, (bh, rows, tokens))
    _expect("vectors", vectors, torch.float32, (vectors.shape[0], 8))
    if rows > MAX_ROWS or stages not in (1, 2) or slots != stages * subs or subs * 8 > MAX_DIM:
        raise ValueError(f"native.nsn_values: at most {MAX_ROWS} rows, 1-2 stages, {MAX_DIM // 8} sub-vectors; "
                         f"got {rows} rows, {stages} stages, {slots} slots")
    count = parts(1, total)
    out = weights.new_empty(count, bh, rows, subs * 8)  # each range's sum
    chunk_w = weights.new_empty(bh, rows, chunks)
    arrays = (None,) * 4 if each is not None else (codes, scales, grid, counts)
    library().nsn_values(_ptr(weights), weights.stride(-2), *map(_ptr, arrays), max(chunk_len, 1), _ptr(vectors),
                         float(beta), _ptr(out), _ptr(chunk_w), bh, rows, tokens, stages, subs, chunks, count,
                         _ptr(None if each is None else each.table))
    if by_range:
        return out, chunk_w
    return out.sum(0) if count > 1 else out[0], chunk_w


class RowBlocks(_RowTable):
    """One KIVI block a row for rows of different lengths, each row in tensors of its own (a store
    per row: ``kv/quantized_rows.py``), as the loops take them: a table of each row's addresses
    and token count. ``rows`` is a list of ``(codes (T, D * bits / 8) uint8, scale, minimum)``
    contiguous tensors, float32 ``(T / group, D)`` (keys) or ``(T, D / group)`` (``per_token``:
    values), or None for a row with no block; the tensors are kept alive with the table."""

    columns, tokens_column = 4, 3

    def __init__(self, rows: list, *, dim: int, bits: int, group: int, per_token: bool):
        self.per_token, self.dim, self.bits, self.group = per_token, dim, bits, group
        super().__init__(rows)

    def _entry(self, index: int, row) -> list[int]:
        if row is None:
            return [0] * self.columns
        codes, scale, minimum = row
        tokens, dim, group = codes.shape[0], self.dim, self.group
        if tokens % group and not self.per_token:
            raise ValueError(f"native.RowBlocks: rows[{index}] holds {tokens} keys, not groups of {group}")
        shape = (tokens, dim // group) if self.per_token else (tokens // group, dim)
        _expect(f"rows[{index}] codes", codes, torch.uint8, (tokens, dim * self.bits // 8))
        _expect(f"rows[{index}] scale", scale, torch.float32, shape)
        _expect(f"rows[{index}] minimum", minimum, torch.float32, shape)
        return [codes.data_ptr(), scale.data_ptr(), minimum.data_ptr(), tokens]


def _kivi_check(where: str, codes: torch.Tensor, dim: int, bits: int, group: int, group_axis_len: int) -> None:
    if bits not in (1, 2, 4, 8) or dim % 8 or dim > MAX_DIM or group_axis_len % group:
        raise ValueError(f"native.{where}: bits in (1, 2, 4, 8), dim a multiple of 8 up to {MAX_DIM}, "
                         f"groups dividing their axis; got bits={bits}, dim={dim}, group={group}")


def _row_blocks(where: str, blocks: RowBlocks, heads: int, per_token: bool, dim: int, bits: int, group: int) -> None:
    """The call reads ``blocks`` as they were built (their addresses say nothing of their shapes)."""
    if len(blocks.table) != heads or blocks.per_token != per_token:
        raise ValueError(f"native.{where}: {len(blocks.table)} rows of {'value' if blocks.per_token else 'key'} "
                         f"blocks for {heads} heads of {'value' if per_token else 'key'} reads")
    if (blocks.dim, blocks.bits, blocks.group) != (dim, bits, group):
        raise ValueError(f"native.{where}: blocks built for dim={blocks.dim}, bits={blocks.bits}, "
                         f"group={blocks.group}, read as dim={dim}, bits={bits}, group={group}")


def kivi_key_scores(rows: torch.Tensor, codes: torch.Tensor | RowBlocks, scale: torch.Tensor | None,
                    minimum: torch.Tensor | None, bits: int, group: int, out: torch.Tensor) -> torch.Tensor:
    """Writes ``out (BH, R, T)``: query ``rows (BH, R, D)`` float32 dotted with one KIVI key block
    (``codes (BH, T, D * bits / 8)`` uint8, ``scale``/``minimum (BH, T / group, D)`` float32),
    or with each row's block of a ``RowBlocks`` (``scale``, ``minimum`` None; ``T`` its longest
    row, and only each row's first columns written)."""
    bh, num_rows, dim = rows.shape
    each = codes if isinstance(codes, RowBlocks) else None
    if each is not None:
        _row_blocks("kivi_key_scores", each, bh, False, dim, bits, group)
        tokens, total = each.tokens, each.total
        _kivi_check("kivi_key_scores", None, dim, bits, group, 0)
    else:
        tokens = codes.shape[1]
        total = bh * tokens
        _kivi_check("kivi_key_scores", codes, dim, bits, group, tokens)
        _expect("codes", codes, torch.uint8, (bh, tokens, dim * bits // 8))
        _expect("scale", scale, torch.float32, (bh, tokens // group, dim))
        _expect("minimum", minimum, torch.float32, (bh, tokens // group, dim))
    _expect("rows", rows, torch.float32, (bh, num_rows, dim))
    _expect_rows("out", out, (bh, num_rows, tokens))
    if num_rows > MAX_ROWS:
        raise ValueError(f"native.kivi_key_scores: at most {MAX_ROWS} rows, got {num_rows}")
    arrays = (None,) * 3 if each is not None else (codes, scale, minimum)
    library().kivi_key_scores(_ptr(rows), *map(_ptr, arrays), _ptr(out), out.stride(-2), bh, num_rows, tokens, dim,
                              bits, group, parts(1, total), _ptr(None if each is None else each.table))
    return out


def kivi_values(weights: torch.Tensor, codes: torch.Tensor | RowBlocks, scale: torch.Tensor | None,
                minimum: torch.Tensor | None, bits: int, group: int, out: torch.Tensor, *,
                by_range: bool = False) -> torch.Tensor:
    """Adds into ``out (BH, R, D)`` float32 the ``weights (BH, R, T)``-weighted sum of one KIVI
    value block (``codes (BH, T, D * bits / 8)``, ``scale``/``minimum (BH, T, D / group)``), or
    of each row's block of a ``RowBlocks`` (``scale``, ``minimum`` None; each row's first columns
    of ``weights`` read). ``by_range``: returns the sums per range of tokens, ``(parts, BH, R,
    D)``, and leaves ``out`` alone (to test that each range keeps its own sum)."""
    bh, num_rows, dim = out.shape
    tokens = weights.shape[-1]
    each = codes if isinstance(codes, RowBlocks) else None
    if each is not None:
        _row_blocks("kivi_values", each, bh, True, dim, bits, group)
        _kivi_check("kivi_values", None, dim, bits, group, dim)
        if each.tokens > tokens:
            raise ValueError(f"native.kivi_values: rows of up to {each.tokens} tokens for weights "
                             f"{tuple(weights.shape)}")
        total = each.total
    else:
        tokens, total = codes.shape[1], bh * codes.shape[1]
        _kivi_check("kivi_values", codes, dim, bits, group, dim)
        _expect("codes", codes, torch.uint8, (bh, tokens, dim * bits // 8))
        _expect("scale", scale, torch.float32, (bh, tokens, dim // group))
        _expect("minimum", minimum, torch.float32, (bh, tokens, dim // group))
    if group % 8:
        raise ValueError(f"native.kivi_values: group must be a multiple of 8, got {group}")
    _expect_rows("weights", weights, (bh, num_rows, tokens))
    _expect("out", out, torch.float32, (bh, num_rows, dim))
    if num_rows > MAX_ROWS:
        raise ValueError(f"native.kivi_values: at most {MAX_ROWS} rows, got {num_rows}")
    count = parts(1, total)
    # each range adds into its own sums (the only one: straight into out)
    sums = out.new_zeros(count, *out.shape) if by_range or count > 1 else out
    arrays = (None,) * 3 if each is not None else (codes, scale, minimum)
    library().kivi_values(_ptr(weights), weights.stride(-2), *map(_ptr, arrays), _ptr(sums), bh, num_rows, tokens,
                          dim, bits, group, count, _ptr(None if each is None else each.table))
    if by_range:
        return sums
    if count > 1:
        out += sums.sum(0)
    return out


def nsn_encode(y: torch.Tensor, vectors: torch.Tensor, beta: float, stages: int, beam: int) -> torch.Tensor:
    """Codes ``(N, stages)`` int64 of 8-dim sub-vectors ``y (N, 8)`` float32 against the codebook
    ``vectors (K, 8)``: ``codebook.encode``'s choices (stage 1 the nearest vector; two stages, the
    best pair over the ``beam`` nearest first vectors), one pass over ``y``. Only near-ties (the
    dot products round differently) and exact ties (the lower index here) can choose differently
    from the torch path, at the same error; a sub-vector with NaN scores gets code 0."""
    book = vectors.shape[0]
    _expect("y", y, torch.float32, (y.shape[0], 8))
    _expect("vectors", vectors, torch.float32, (book, 8))
    if stages not in (1, 2) or not 8 <= book <= MAX_BOOK or book % 8 or not 1 <= beam <= MAX_BEAM:
        raise ValueError(f"native.nsn_encode: 1-2 stages, a multiple of 8 vectors (8 to {MAX_BOOK}), a beam of "
                         f"1-{MAX_BEAM}; got {stages} stages, {book} vectors, beam {beam}")
    if not math.isfinite(beta):
        raise ValueError(f"native.nsn_encode: beta must be finite, got {beta!r}")
    half_norms = (0.5 * (vectors * vectors).sum(1)).contiguous()
    gram = (vectors @ vectors.T).contiguous()
    transposed = vectors.T.contiguous()  # held here: a temporary would be freed before the call reads it
    out = torch.empty(y.shape[0], stages, dtype=torch.int64)
    library().nsn_encode(_ptr(y), _ptr(transposed), _ptr(half_norms), _ptr(gram), float(beta), y.shape[0], book,
                         stages, min(beam, book), _ptr(out))
    return out


def rows_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor | None, lengths: torch.Tensor,
                *, width: int, scale: float, softcap: float | None, need_mass: bool):
    """One decode step over a ragged layer's full-precision rows (``kv/ragged.py``), read where
    they lie: ``(out (R, G, D), mass (R, width) or None)`` float32.

    ``q (R, G, D)`` float32, one query token of G heads a row; ``k``/``v`` float32, either
    ``(R, capacity, D)`` (one tensor, ``table`` None) or a pool of pages ``(P, page, D)`` with
    ``table (R, max pages)`` int32; ``lengths (R,)`` int32 tokens a row, at most ``width``;
    ``mass``: each token's probability summed over the row's heads, zero past its length. A NaN
    logit makes its row NaN, as torch's softmax does."""
    rows, groups, dim = q.shape
    slots = k.shape[1]
    tensors = {"q": q, "k": k, "v": v, "lengths": lengths, **({} if table is None else {"table": table})}
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu":
            raise ValueError(f"native.rows_decode: {name} must be on the CPU, got {tensor.device}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"native.rows_decode: softcap must be None or > 0, got {softcap!r}")
    _expect("q", q, torch.float32, (rows, groups, dim))
    _expect("k", k, torch.float32, (k.shape[0], slots, dim))
    _expect("v", v, torch.float32, tuple(k.shape))
    _expect("lengths", lengths, torch.int32, (rows,))
    if table is None:
        if k.shape[0] != rows:
            raise ValueError(f"native.rows_decode: k holds {k.shape[0]} rows for {rows} rows of queries")
    else:
        _expect("table", table, torch.int32, (rows, table.shape[1]))
    if dim % 8 or dim > MAX_DIM:
        raise ValueError(f"native.rows_decode: D must be a multiple of 8 up to {MAX_DIM}, got {dim}")
    # out-of-range reads would leave the tensors: a few reductions over (R,) and the table, per call
    capacity = slots if table is None else table.shape[1] * slots
    longest = int(lengths.max()) if rows else 0
    if rows and (int(lengths.min()) < 0 or longest > min(width, capacity)):
        raise ValueError(f"native.rows_decode: lengths must lie in [0, min(width={width}, capacity={capacity})], "
                         f"got up to {longest}")
    if table is not None and rows and longest:
        used = table[:, :(longest + slots - 1) // slots]
        if int(used.min()) < 0 or int(used.max()) >= k.shape[0]:
            raise ValueError(f"native.rows_decode: table must hold page ids in [0, {k.shape[0]}) where rows have "
                             f"tokens, got [{int(used.min())}, {int(used.max())}]")
    padded = (width + 7) // 8 * 8  # the softmax runs 8 tokens at a time
    scores = q.new_empty(rows, groups, padded)
    out = q.new_empty(rows, groups, dim)
    mass = q.new_empty(rows, padded) if need_mass else None
    library().rows_decode(_ptr(q), _ptr(k), _ptr(v), _ptr(table), _ptr(lengths), rows, groups, dim, slots,
                          0 if table is None else table.shape[1], float(scale), float(softcap or 0.0), _ptr(scores),
                          padded, _ptr(out), _ptr(mass), parts(1, rows * width))
    return out, None if mass is None else mass[:, :width]



def softmax_rows(scores: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, *, groups: int,
                 key_valid: torch.Tensor | None = None, query_valid: torch.Tensor | None = None,
                 write: bool, need_lse: bool, need_mass: bool, need_peak: bool):
    """``kernels/scores.py``'s softmax of one chunk of logits in place, each row over its own
    visible keys, with the per-key statistics: ``(lse (B, H_kv, R) or None, mass, peak)``, the
    last two ``(B, H_kv, G, W)`` per query-head group (the caller reduces over G) or None.

    ``scores (B, H_kv, R, W)`` float32 on the CPU with a unit last stride (any other strides),
    rows ``(g, q)`` with ``R = groups * Q``; row ``(b, q)`` sees keys ``lo[b, q] <= j <
    hi[b, q]`` (``lo``/``hi (B or 1, Q)`` int32) where ``key_valid (B, W)`` (uint8 or bool) is
    set; only rows with ``query_valid (B, Q)`` set add to mass and peak. ``write``: the
    probabilities replace the logits; else the buffer is left as scratch."""
    batch, kv_heads, rows, width = scores.shape
    queries = rows // groups if groups else 0
    for name, tensor in {"scores": scores, "lo": lo, "hi": hi, "key_valid": key_valid,
                         "query_valid": query_valid}.items():
        if tensor is not None and tensor.device.type != "cpu":
            raise ValueError(f"native.softmax_rows: {name} must be on the CPU, got {tensor.device}")
    if groups < 1 or rows != groups * queries:
        raise ValueError(f"native.softmax_rows: scores holds {rows} rows a head, not groups={groups} times a "
                         "number of queries")
    overlap = (rows > 1 and scores.stride(2) < width) or any(
        size > 1 and stride == 0 for size, stride in zip(scores.shape[:2], scores.stride()[:2], strict=True))
    if scores.dtype != torch.float32 or (width > 1 and scores.stride(3) != 1) or overlap:
        raise ValueError(f"native.softmax_rows: scores must be float32 with unit stride in its last dim and rows "
                         f"that do not overlap, got {scores.dtype} strides {scores.stride()}")
    _expect("lo", lo, torch.int32, (lo.shape[0], queries))
    _expect("hi", hi, torch.int32, tuple(lo.shape))
    if lo.shape[0] not in (1, batch):
        raise ValueError(f"native.softmax_rows: lo/hi must have 1 or {batch} rows, got {lo.shape[0]}")
    flags = {}
    for name, tensor, shape in (("key_valid", key_valid, (batch, width)), ("query_valid", query_valid, (batch, queries))):
        if tensor is not None:
            tensor = tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor
            _expect(name, tensor, torch.uint8, shape)
        flags[name] = tensor
    heads = batch * kv_heads
    f32 = {"dtype": torch.float32}
    lse = torch.empty(batch, kv_heads, rows, **f32) if need_lse else None
    mass = torch.empty(batch, kv_heads, groups, width, **f32) if need_mass else None
    peak = torch.empty(batch, kv_heads, groups, width, **f32) if need_peak else None
    strides = [scores.stride(0), scores.stride(1), scores.stride(2)]
    library().softmax_rows(_ptr(scores), heads, kv_heads, groups, queries, width, *strides, _ptr(lo), _ptr(hi),
                           lo.shape[0], _ptr(flags["key_valid"]), _ptr(flags["query_valid"]), int(write), _ptr(lse),
                           _ptr(mass), _ptr(peak), parts(heads * groups, rows * width // max(1, groups)))
    return lse, mass, peak
