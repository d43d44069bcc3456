"""The slow tier of an offloaded MoE model: where experts live when they are not cached.

An expert is the tuple of its slices of the experts module's fused parameters (for a gated FFN
``gate_up_proj[e]`` and ``down_proj[e]``), in a fixed order of parameter names.

- ``CpuStore`` keeps the fused tensors in CPU memory (pinned when the model runs on CUDA, so
  copies to the device can be asynchronous) and hands out views.
- ``DiskStore`` writes the experts to one safetensors file, one entry per expert and parameter,
  and reads an expert back with positional reads (``os.preadv``) of just its bytes, so the
  process holds no copy of the experts it is not using. The file is a normal safetensors file.
  With ``direct=True`` the reads bypass the OS page cache (``O_DIRECT``, Linux): the experts
  then sit in neither the process nor the page cache, as when they do not fit in RAM, and every
  miss is a real read from the device. A file written with ``align=4096`` (as ``offload_experts``
  writes it for direct reads) starts every tensor at a multiple of 4096 bytes, so an expert is
  read straight into tensors that start at such a multiple (``slot_alignment``): their whole
  4096-byte blocks in place, each one's last partial block (if any) through a small buffer and
  a copy of under 4096 bytes. Nothing past a tensor's end is written. Other tensors go through
  a page-aligned buffer of the expert's size and one copy.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import struct
import tempfile
import threading
from pathlib import Path

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
_NAMES = {v: k for k, v in _DTYPES.items()}
# O_DIRECT needs offset, length and buffer aligned to the device's logical block (512 or 4096
# bytes): 4096 serves both
_DIRECT_ALIGN = 4096


def direct_io_unsupported(directory: str | Path) -> str | None:
    """Why a file in ``directory`` cannot be read with ``O_DIRECT`` (None when it can): no
    ``O_DIRECT`` on this OS, or a file system that refuses it (tmpfs, some network file systems)."""
    if not hasattr(os, "O_DIRECT"):
        return "this OS has no O_DIRECT (Linux only)"
    if not Path(directory).is_dir():
        return None  # nothing to probe: writing the expert file there fails with its own error
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".effllm-direct-probe-") as probe:
            probe.write(b"\0" * _DIRECT_ALIGN)
            probe.flush()
            fd = os.open(probe.name, os.O_RDONLY | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, _DIRECT_ALIGN)
                os.preadv(fd, [buf], 0)
                buf.close()
            finally:
                os.close(fd)
    except OSError as exc:
        return f"the file system of {str(directory)!r} refuses O_DIRECT reads ({exc.strerror or exc})"
    return None


class ExpertStore:
    """``load(column, expert)`` returns the expert's tensors (on CPU), or fills ``out`` (contiguous CPU
    tensors of the right shapes, a cache slot) and returns it; ``expert_bytes`` their size."""

    names: tuple[str, ...]
    expert_bytes: list[int]  # per column
    # When set: ``load`` reads straight into ``out`` tensors that start at a multiple of this
    # many bytes (no copy of the expert); callers that can lay their slots out that way (the
    # offload's slabs, ``slab()``) do.
    slot_alignment: int | None = None

    def load(self, column: int, expert: int, out: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def buffer_bytes(self) -> int:
        """Bytes of read buffers the store holds besides the experts it hands out."""
        return 0

    def load_all(self, column: int) -> tuple[torch.Tensor, ...]:
        """Every expert of a column as fused tensors (to restore the model)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class CpuStore(ExpertStore):
    def __init__(self, names: tuple[str, ...], columns: list[tuple[torch.Tensor, ...]], pin: bool):
        self.names = names
        self.columns = []
        for tensors in columns:
            moved = tuple(t.detach().to("cpu") for t in tensors)
            if pin:
                moved = tuple(t.pin_memory() for t in moved)
            self.columns.append(moved)
        self.expert_bytes = [sum(t[0].numel() * t.element_size() for t in ts) for ts in self.columns]

    def load(self, column: int, expert: int, out: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
        tensors = tuple(t[expert] for t in self.columns[column])
        if out is None:
            return tensors
        for dst, src in zip(out, tensors):
            dst.copy_(src)
        return out

    def load_all(self, column: int) -> tuple[torch.Tensor, ...]:
        return self.columns[column]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def slab(slots: int, shape: tuple, dtype: torch.dtype, alignment: int | None = None) -> torch.Tensor:
    """``(slots, *shape)`` uninitialised; with ``alignment``, every slot starts at a multiple of it
    (slots padded to it: a store with that ``slot_alignment`` reads straight into them)."""
    if alignment is None:
        return torch.empty((slots, *shape), dtype=dtype)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment % dtype.itemsize:
        raise ValueError(f"slab: alignment must be None or a positive multiple of {dtype.itemsize} bytes "
                         f"({dtype}), got {alignment!r}")
    stride = _round_up(torch.Size(shape).numel() * dtype.itemsize, alignment)
    flat = torch.empty(slots * stride + alignment, dtype=torch.uint8)
    start = -flat.data_ptr() % alignment
    inner = torch.empty(shape, dtype=dtype, device="meta").stride()
    return flat[start:start + slots * stride].view(dtype).as_strided((slots, *shape), (stride // dtype.itemsize, *inner))


def _key(column: int, expert: int, name: str) -> str:
    return f"moe.{column}.experts.{expert}.{name}"


class DiskStore(ExpertStore):
    """Experts in one safetensors file, read one expert at a time (``direct``: with ``O_DIRECT``,
    straight into aligned slots of an aligned file, else through a page-aligned buffer per
    reading thread of one expert's size, then copied into the slot)."""

    def __init__(self, path: str | Path, names: tuple[str, ...], num_experts: list[int], direct: bool = False):
        self.path = Path(path)
        self.names = names
        self.num_experts = num_experts
        self.direct = bool(direct)
        self.fd = self.direct_fd = None
        if not self.path.is_file():
            raise FileNotFoundError(f"expert file {str(self.path)!r} does not exist")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            if self.direct and hasattr(os, "posix_fadvise"):  # no readahead of expert bytes with the header
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ValueError(f"{self.path}: truncated safetensors file (header of {header_len} bytes, file "
                                 f"{size} bytes)")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{self.path}: not a safetensors file (bad header: {exc})") from None
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        end = 0
        for column, n in enumerate(num_experts):
            for expert in range(n):
                for name in names:
                    key = _key(column, expert, name)
                    if key not in header:
                        raise ValueError(f"{self.path}: no entry {key!r}; the file does not hold this model's experts")
                    info = header[key]
                    begin, stop = info["data_offsets"]
                    self.entries[key] = (_DTYPES[info["dtype"]], info["shape"], begin, stop)
                    end = max(end, stop)
        if self.data_start + end > size:
            raise ValueError(f"{self.path}: truncated safetensors file (needs {self.data_start + end} bytes, has {size})")
        self.expert_bytes = [sum(self.entries[_key(c, 0, name)][3] - self.entries[_key(c, 0, name)][2]
                                 for name in names) for c in range(len(num_experts))]
        # Per expert, once: its tensors' (shape, dtype), what ``load(out=)`` must be given; a span
        # when its entries lie back to back in the order of names (as write() lays them out: one
        # read of (offset, bytes) fills all its tensors); its start when aligned (every tensor at a
        # multiple of _DIRECT_ALIGN, the next at the first multiple after the previous one's end,
        # as write(align=4096) lays them out).
        self.kinds: dict[tuple[int, int], list[tuple[torch.Size, torch.dtype]]] = {}
        self.spans: dict[tuple[int, int], tuple[int, int]] = {}
        self.aligned: dict[tuple[int, int], int] = {}
        for column, n in enumerate(num_experts):
            for expert in range(n):
                entries = [self.entries[_key(column, expert, name)] for name in names]
                self.kinds[column, expert] = [(torch.Size(shape), dtype) for dtype, shape, _, _ in entries]
                parts = [(begin, stop) for _, _, begin, stop in entries]
                if all(a[1] == b[0] for a, b in itertools.pairwise(parts)):
                    self.spans[column, expert] = (self.data_start + parts[0][0], parts[-1][1] - parts[0][0])
                starts = [self.data_start + begin for begin, _ in parts]
                if all(start % _DIRECT_ALIGN == 0 for start in starts) and all(
                        b[0] == _round_up(a[1], _DIRECT_ALIGN) for a, b in itertools.pairwise(parts)):
                    self.aligned[column, expert] = starts[0]
        self.fd = os.open(self.path, os.O_RDONLY)
        if self.direct:
            try:
                self.direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except (AttributeError, OSError) as exc:
                self.close()
                raise ValueError(f"{self.path}: cannot be read with O_DIRECT "
                                 f"({getattr(exc, 'strerror', None) or exc}); use direct=False") from None
            # page-aligned read buffers by reading thread (the forward, the loader), kept until close()
            self._buffers: dict[int, mmap.mmap] = {}
            self._buffers_lock = threading.Lock()
            if len(self.aligned) == sum(num_experts):
                self.slot_alignment = _DIRECT_ALIGN

    @staticmethod
    def write(path: str | Path, names: tuple[str, ...], columns: list[tuple[torch.Tensor, ...]],
              align: int | None = None) -> Path:
        """Write every expert of every column to ``path`` (one entry per expert and parameter).
        ``align``: start the data and every tensor at a multiple of ``align`` bytes; the gaps are
        ``__pad__.N`` uint8 entries (safetensors allows no unindexed bytes), so the file stays a
        normal safetensors file."""
        if align is not None and (isinstance(align, bool) or not isinstance(align, int) or align < 8 or align % 8):
            raise ValueError(f"DiskStore.write: align must be None or a multiple of 8 bytes, got {align!r}")
        path = Path(path)
        header: dict = {"__metadata__": {"format": "effllm.moe.experts"}}
        offset = 0
        order = []
        for column, tensors in enumerate(columns):
            for expert in range(tensors[0].shape[0]):
                for name, fused in zip(names, tensors):
                    gap = -offset % align if align else 0
                    if gap:
                        header[f"__pad__.{len(order)}"] = {"dtype": "U8", "shape": [gap],
                                                           "data_offsets": [offset, offset + gap]}
                        order.append(torch.zeros(gap, dtype=torch.uint8))
                        offset += gap
                    t = fused[expert]
                    nbytes = t.numel() * t.element_size()
                    header[_key(column, expert, name)] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                                                          "data_offsets": [offset, offset + nbytes]}
                    order.append(t)
                    offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        # safetensors pads the header with spaces to 8 bytes; aligned: to where the data starts aligned
        blob += b" " * (-(8 + len(blob)) % (align or 8))
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for t in order:
                # one expert slice at a time: no second copy of all experts in memory
                f.write(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        os.replace(tmp, path)
        return path

    def _read(self, key: str) -> torch.Tensor:
        dtype, shape, begin, stop = self.entries[key]
        buf = bytearray(stop - begin)
        got = os.preadv(self.fd, [buf], self.data_start + begin)
        if got != len(buf):
            raise OSError(f"{self.path}: short read of {key!r} ({got} of {len(buf)} bytes; was the file truncated?)")
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)

    def _thread_buffer(self, nbytes: int) -> mmap.mmap:
        """This thread's page-aligned read buffer, at least ``nbytes`` long (the forward and the
        loader thread read at the same time, so each has its own)."""
        thread = threading.get_ident()
        with self._buffers_lock:
            buf = self._buffers.get(thread)
            if buf is None or len(buf) < nbytes:
                if buf is not None:
                    buf.close()
                buf = self._buffers[thread] = mmap.mmap(-1, _round_up(nbytes, _DIRECT_ALIGN))
        return buf

    def buffer_bytes(self) -> int:
        """The page-aligned read buffers the reading threads hold (an expert's size for reads into
        tensors that are not aligned; a block per tensor for the tails of aligned reads)."""
        if not self.direct:
            return 0
        with self._buffers_lock:
            return sum(len(buf) for buf in self._buffers.values())

    def _read_in_place(self, column: int, expert: int, out: tuple[torch.Tensor, ...]) -> bool:
        """One O_DIRECT read of an aligned expert straight into ``out``: each tensor's whole blocks
        in place, its partial last block into this thread's buffer, then copied (under 4096 bytes
        a tensor). False (nothing read) when the expert or a tensor is not aligned."""
        start = self.aligned.get((column, expert))
        if start is None or any(not t.is_contiguous() or t.data_ptr() % _DIRECT_ALIGN for t in out):
            return False
        sizes = [t.numel() * t.element_size() for t in out]
        tails = [n % _DIRECT_ALIGN for n in sizes]
        buf = self._thread_buffer(_DIRECT_ALIGN * sum(1 for tail in tails if tail)) if any(tails) else None
        views, copies, used = [], [], 0
        for t, nbytes, tail in zip(out, sizes, tails):
            flat = t.view(torch.uint8).view(-1)
            whole = nbytes - tail
            if whole:
                views.append(flat[:whole].numpy())
            if tail:
                views.append(memoryview(buf)[used:used + _DIRECT_ALIGN])
                copies.append((flat[whole:], used, tail))
                used += _DIRECT_ALIGN
        try:
            got = os.preadv(self.direct_fd, views, start)
        finally:
            for view in views:
                if isinstance(view, memoryview):
                    view.release()
        need = sum(_round_up(n, _DIRECT_ALIGN) for n in sizes[:-1]) + sizes[-1]
        if got < need:  # the last block may be partial at the end of the file
            raise OSError(f"{self.path}: short read of expert {expert} of MoE layer {column} "
                          f"({got} of {need} bytes; was the file truncated?)")
        for dst, at, tail in copies:
            dst.copy_(torch.frombuffer(buf, dtype=torch.uint8, count=tail, offset=at))
        return True

    def _read_direct(self, offset: int, nbytes: int, out: tuple[torch.Tensor, ...], what: str) -> None:
        """Fill ``out`` (back to back in the file from ``offset``) with one O_DIRECT read of the
        aligned blocks around them."""
        start = offset // _DIRECT_ALIGN * _DIRECT_ALIGN
        stop = _round_up(offset + nbytes, _DIRECT_ALIGN)
        buf = self._thread_buffer(stop - start)
        view = memoryview(buf)[:stop - start]
        try:
            got = os.preadv(self.direct_fd, [view], start)  # short at the end of the file: the last block is partial
        finally:
            view.release()
        if got < offset + nbytes - start:
            raise OSError(f"{self.path}: short read of {what} ({max(0, got - (offset - start))} of {nbytes} bytes; "
                          f"was the file truncated?)")
        src = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset - start)
        pos = 0
        for dst in out:
            n = dst.numel() * dst.element_size()
            dst.view(torch.uint8).view(-1).copy_(src[pos:pos + n])  # dst: a contiguous slot
            pos += n

    def _check_out(self, column: int, expert: int, out: tuple[torch.Tensor, ...]) -> None:
        want = self.kinds[column, expert]
        got = [(t.shape, t.dtype) if isinstance(t, torch.Tensor) else (type(t).__name__, None) for t in out]
        if len(out) != len(want) or got != want or any(t.device.type != "cpu" or not t.is_contiguous() for t in out):
            raise ValueError(f"DiskStore.load: out must be {len(want)} contiguous CPU tensors of "
                             f"{[(tuple(s), d) for s, d in want]} (expert {expert} of MoE layer {column}), got "
                             f"{[(tuple(s) if isinstance(s, torch.Size) else s, d) for s, d in got]}")

    def load(self, column: int, expert: int, out: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
        if out is not None:
            self._check_out(column, expert, out)  # a wrong slot would get misplaced bytes
        if self.direct:
            if out is None:  # tensors of its own, laid out to be read into
                out = tuple(slab(1, shape, dtype, self.slot_alignment)[0] for shape, dtype in self.kinds[column, expert])
            if self._read_in_place(column, expert, out):
                return out
            span = self.spans.get((column, expert))
            if span is not None:
                self._read_direct(span[0], span[1], out, f"expert {expert} of MoE layer {column}")
                return out
            for name, dst in zip(self.names, out):
                _, _, begin, stop = self.entries[_key(column, expert, name)]
                self._read_direct(self.data_start + begin, stop - begin, (dst,), repr(_key(column, expert, name)))
            return out
        span = self.spans.get((column, expert)) if out is not None else None
        if span is None:
            tensors = tuple(self._read(_key(column, expert, name)) for name in self.names)
            if out is None:
                return tensors
            for dst, src in zip(out, tensors):
                dst.copy_(src)
            return out
        # straight into the slot: one positional read, no intermediate buffer or copy
        got = os.preadv(self.fd, [t.view(torch.uint8).numpy() for t in out], span[0])
        if got != span[1]:
            raise OSError(f"{self.path}: short read of expert {expert} of MoE layer {column} ({got} of {span[1]} bytes; "
                          f"was the file truncated?)")
        return out

    def load_all(self, column: int) -> tuple[torch.Tensor, ...]:
        experts = [self.load(column, e) for e in range(self.num_experts[column])]
        return tuple(torch.stack([ex[i] for ex in experts]) for i in range(len(self.names)))

    def close(self) -> None:
        buffers = getattr(self, "_buffers", None)
        if buffers:
            with self._buffers_lock:
                for buf in buffers.values():
                    buf.close()
                buffers.clear()
        for name in ("fd", "direct_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
