"""hypothesis strategies for kernel shapes: deliberately odd sizes that exercise every mask.

Imported only by tests and benchmarks (hypothesis is a test dependency, not a runtime one).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

HEAD_DIMS = (64, 80, 96, 128)
GQA_RATIOS = (1, 2, 3, 4, 8)


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def odd_lengths(min_value: int = 1, max_value: int = 160) -> st.SearchStrategy[int]:
    """Lengths that are not multiples of 16 (block sizes are), plus the edges around a block."""
    return st.one_of(
        st.integers(min_value, max_value).filter(lambda n: n % 16 != 0),
        st.sampled_from([n for n in (1, 15, 17, 31, 33, 63, 65, 127, 129) if min_value <= n <= max_value]),
    )


@st.composite
def attention_shapes(
    draw,
    *,
    max_batch: int = 3,
    max_seqlen: int = 160,
    max_kv_heads: int = 2,
    head_dims: tuple[int, ...] = HEAD_DIMS,
    gqa_ratios: tuple[int, ...] = GQA_RATIOS,
    equal_lengths: bool = False,
) -> AttentionShape:
    kv_heads = draw(st.integers(1, max_kv_heads))
    ratio = draw(st.sampled_from(gqa_ratios))
    seqlen_q = draw(odd_lengths(1, max_seqlen))
    seqlen_k = seqlen_q if equal_lengths else draw(odd_lengths(1, max_seqlen))
    return AttentionShape(
        batch=draw(st.integers(1, max_batch)),
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        heads=kv_heads * ratio,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from(head_dims)),
    )


@st.composite
def ragged_lengths(draw, *, max_batch: int = 4, max_len: int = 130) -> list[int]:
    """Per-sequence lengths of a ragged (varlen / paged) batch; at least one is not a block multiple."""
    lengths = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=max_batch))
    if all(n % 16 == 0 for n in lengths):
        lengths[0] = lengths[0] - 1 if lengths[0] > 1 else 1
    return lengths
