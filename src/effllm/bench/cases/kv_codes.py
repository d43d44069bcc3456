"""NSNQuant on one SmolLM2 layer (T tokens x 3 KV heads x head dim 64): the encoder (the fused
CPU loop of effllm/native against the torch ops) and a decode step's attention over the codes (the C
loops on CPU or the Triton kernel on CUDA against the torch ops), with and without every key
coded twice; and a decode step over a ragged layer's rows, coded (kv.attend_rows) or float32
(kv.rows_decode)."""

from __future__ import annotations

import torch

from ... import native
from ...kv import NSNQuant
from ...kv import codebook as cb
from ...kv import codes_attention as ca
from ..registry import Setup, case

_SHAPES = [{"T": 1024, "stages": 2}, {"T": 4096, "stages": 2}, {"T": 4096, "stages": 1}]


@case("kv.nsn_encode", shapes=_SHAPES, baseline="torch", quick_shapes=_SHAPES[:1],
      description="NSNQuant codes of T tokens x 3 heads x 64 dims: the fused loop vs torch ops")
def nsn_encode_case(shape, dtype, device) -> Setup:
    gen = torch.Generator(device="cpu").manual_seed(0)
    y = torch.randn(shape["T"] * 3 * 64 // 8, 8, generator=gen).to(device, dtype)
    book, stages = cb.codebook(8), shape["stages"]
    providers = {"torch": lambda: cb.encode_torch(y, book, stages)}
    unavailable = {}
    if device.type == "cpu" and native.available():
        vectors = book.vectors.contiguous()
        providers["effllm"] = lambda: native.nsn_encode(y, vectors, book.beta, stages, cb.BEAM)
    else:
        unavailable["effllm"] = "the fused loops are CPU-only" if device.type != "cpu" else native.why_unavailable()
    return Setup(providers=providers, bytes_moved=y.numel() * y.element_size(), unavailable=unavailable)


# second: bits of every key's second code (key_heads="all", key_residual="codes"); 0: none
_ATTEND_SHAPES = [{"T": 4096, "second": 0}, {"T": 4096, "second": 1}, {"T": 4096, "second": 2}]


@case("kv.nsn_attend", shapes=_ATTEND_SHAPES, gpu_shapes=[{"T": 32768, "second": 0}, {"T": 32768, "second": 1}],
      baseline="torch", quick_shapes=[{"T": 512, "second": 1}],
      description="one decode step of a SmolLM2 layer (9 query / 3 KV heads) over T NSNQuant-2 codes, "
                  "'second' the bits of every key's second code (0: none): effllm's path vs torch ops (whose "
                  "second-code scores still go through the C loop where it builds)")
def nsn_attend_case(shape, dtype, device) -> Setup:
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens, second = shape["T"], shape["second"]
    keys, values = (torch.randn(1, 3, tokens, 64, generator=gen).to(device, dtype) for _ in range(2))
    query = torch.randn(1, 9, 1, 64, generator=gen).to(device, dtype)
    extra = {"key_heads": "all", "key_residual": "codes", "key_residual_bits": second} if second else {}
    store = NSNQuant(bits=2, **extra).new_store()
    store.append(keys, values)
    rows, scale = ca._rows(query, 3), 0.125
    providers = {"torch": lambda: ca._unrows(ca._nsn_attend_torch(rows, store, scale, None, 1)[0], 9, 1, dtype)}
    unavailable = {}
    if device.type == "cuda":
        providers["effllm"] = lambda: ca.nsn_attend(store, query, scale, backend="triton")
    elif native.available():
        providers["effllm"] = lambda: ca.nsn_attend(store, query, scale)  # the C loops
    else:
        unavailable["effllm"] = native.why_unavailable()
    coded_bytes = store.nbytes() - 2 * store.key_window.numel() * store.key_window.element_size()
    return Setup(providers=providers, reference=lambda: ca.dense_attend(store.keys().float(), store.values().float(),
                                                                        query.float(), scale),
                 bytes_moved=coded_bytes, unavailable=unavailable)


# rows of different lengths (KVzip's global scope, AdaKV, a left-padded batch) under NSNQuant-2 or KIVI-2
_ROWS_SHAPES = [{"q": q, "B": b, "T": t} for q in ("nsn-2", "kivi-2") for b, t in ((1, 1024), (8, 512), (8, 2048))]


@case("kv.attend_rows", shapes=_ROWS_SHAPES, baseline="one by one",
      quick_shapes=[{"q": "nsn-2", "B": 2, "T": 256}, {"q": "kivi-2", "B": 2, "T": 256}],
      description="one decode step of a SmolLM2 layer (9 query / 3 KV heads) over B x 3 rows of NSNQuant-2 or "
                  "KIVI-2 codes holding T/2 to T tokens each (a QuantizedRows layer): effllm's one pass over all "
                  "rows vs each row's store attending on its own")
def attend_rows_case(shape, dtype, device) -> Setup:
    from ...kv import KIVI
    from ...kv.quantized_rows import QuantizedRows

    gen = torch.Generator(device="cpu").manual_seed(0)
    count, tokens = 3 * shape["B"], shape["T"]
    keys, values = (torch.randn(count, tokens, 64, generator=gen).to(device, dtype) for _ in range(2))
    lengths = torch.randint(tokens // 2, tokens + 1, (count,), generator=gen)
    quantizer = NSNQuant(bits=2) if shape["q"] == "nsn-2" else KIVI(bits=2)
    rows = QuantizedRows.from_padded(quantizer, keys, values, (torch.arange(tokens) < lengths[:, None]).to(device))
    rows.append(*(torch.randn(count, 1, 64, generator=gen).to(device, dtype) for _ in range(2)))
    query = torch.randn(count, 1, 3, 64, generator=gen).to(device, dtype)
    unavailable = {}
    if device.type != "cpu" or not native.available():
        unavailable["effllm"] = "the one pass is the native loops' (CPU)" if device.type != "cpu" else \
            native.why_unavailable()

    def one_by_one():
        out = torch.empty_like(query)
        for row, store in enumerate(rows.stores):
            out[row] = store.attend(query[row].transpose(0, 1)[None], 0.125)[0]
        return out

    providers = {"one by one": one_by_one}
    if not unavailable:
        providers["effllm"] = lambda: rows.attend(query, 0.125, softcap=None, need_stats=False, backend="auto")[0]
    return Setup(providers=providers, reference=lambda: one_by_one().float(),
                 bytes_moved=rows.nbytes(), unavailable=unavailable)


# a ragged layer's float32 rows (AdaKV, CAKE or any fractional budget on a padded batch, KVzip's
# global scope), one tensor (pages 0) or 64-token pages; mass: the attention each token received
_FLOAT_ROWS_SHAPES = [{"B": b, "T": t, "pages": p, "mass": m} for b, t in ((1, 2048), (8, 512)) for p in (0, 64)
                      for m in (0, 1)]


@case("kv.rows_decode", shapes=_FLOAT_ROWS_SHAPES, baseline="torch",
      quick_shapes=[{"B": 2, "T": 256, "pages": 64, "mass": 1}],
      description="one decode step of a SmolLM2 layer (9 query / 3 KV heads) over B x 3 float32 rows of T/2 to T "
                  "tokens (a ragged layer: RaggedKV, one tensor or 64-token pages), with or without the attention "
                  "mass: effllm's native loop over the rows where they lie vs decode_attention's torch path")
def rows_decode_case(shape, dtype, device) -> Setup:
    from ...kernels.decode import decode_attention_unchecked
    from ...kv.ragged import RaggedKV

    gen = torch.Generator(device="cpu").manual_seed(0)
    count, tokens, mass = 3 * shape["B"], shape["T"], bool(shape["mass"])
    keys, values = (torch.randn(count, tokens, 64, generator=gen).to(device, dtype) for _ in range(2))
    lengths = torch.randint(tokens // 2, tokens + 1, (count,), generator=gen)
    store = RaggedKV.from_padded(keys, values, (torch.arange(tokens) < lengths[:, None]).to(device),
                                 page_size=shape["pages"] or None)
    query = torch.randn(count, 1, 3, 64, generator=gen).to(device, dtype)

    def torch_path():
        result = decode_attention_unchecked(query, **store.decode_args(), scale=0.125, return_stats=mass,
                                            backend="torch")
        return result[0] if mass else result

    unavailable = {}
    if device.type != "cpu" or dtype != torch.float32 or not native.available():
        unavailable["effllm"] = ("the native loop reads float32 CPU rows" if device.type != "cpu"
                                 or dtype != torch.float32 else native.why_unavailable())
    providers = {"torch": torch_path}
    if not unavailable:
        rows_q = query[:, 0].contiguous()
        providers["effllm"] = lambda: native.rows_decode(rows_q, **store.native_args(), scale=0.125, softcap=None,
                                                         need_mass=mass)[0][:, None]
    return Setup(providers=providers, reference=lambda: torch_path().float(), bytes_moved=store.nbytes(),
                 unavailable=unavailable)
