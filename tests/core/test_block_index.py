import pytest
import torch

from dist_compact import BlockIndex


def _rand_mask(B=2, H=3, nq=5, nk=7, p=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, H, nq, nk, generator=g) < p
    m[0, 0, 0] = False  # an empty row
    m[0, 0, 1] = True  # a full row
    return m


def test_dense_roundtrip_and_density():
    m = _rand_mask()
    idx = BlockIndex.from_dense(m, 16)
    assert torch.equal(idx.to_dense(), m)
    assert idx.density() == pytest.approx(m.float().mean().item())
    assert torch.allclose(idx.density(per_head=True), m.double().mean(dim=(0, 2, 3)))
    assert idx.counts.dtype == torch.int32 and idx.indices.dtype == torch.int32
    # kept entries increasing, padding -1
    used = idx.entry_mask()
    assert torch.all(idx.indices[~used] == -1)
    d = idx.indices[..., 1:] - idx.indices[..., :-1]
    assert torch.all(d[used[..., 1:]] > 0)
    assert idx.nnz() == int(m.sum())
    assert "density=" in repr(idx)


def test_full_and_empty():
    f = BlockIndex.full(1, 2, 3, 4, 64)
    assert f.density() == 1.0 and bool(f.to_dense().all())
    e = BlockIndex.from_dense(torch.zeros(1, 2, 3, 4, dtype=torch.bool), 64)
    assert e.density() == 0.0 and e.max_count == 1 and not e.to_dense().any()


def test_union_intersection_broadcast():
    a = _rand_mask(B=1, seed=1)
    b = _rand_mask(B=2, seed=2)
    ia, ib = BlockIndex.from_dense(a, 32), BlockIndex.from_dense(b, 32)
    assert torch.equal(ia.union(ib).to_dense(), a | b)
    assert torch.equal((ia | ib).to_dense(), a | b)
    assert torch.equal(ia.intersection(ib).to_dense(), a & b)
    with pytest.raises(ValueError, match="shapes differ"):
        ia.union(BlockIndex.from_dense(_rand_mask(nk=6), 32))


@pytest.mark.parametrize("chunk", [1, 7 * 5, 2 * 7 * 5, 1 << 24])
def test_from_dense_in_chunks_of_head_slices(monkeypatch, chunk):
    """Rows are compacted a few (batch, head) slices at a time: one, several, a remainder, all at once."""
    import dist_compact.block_index as bi

    monkeypatch.setattr(bi, "_ROWS_CHUNK", chunk)
    m = _rand_mask(B=2, H=3)
    idx = BlockIndex.from_dense(m, 16)
    assert torch.equal(idx.to_dense(), m) and idx.counts.tolist() == m.sum(-1).tolist()
    assert torch.all(idx.indices[~idx.entry_mask()] == -1)


def test_selections_match_dense_slicing():
    m = _rand_mask(B=1, H=4, nq=6, nk=9)
    idx = BlockIndex.from_dense(m, 16)
    assert torch.equal(idx.select_heads(slice(1, 3)).to_dense(), m[:, 1:3])
    assert torch.equal(idx.select_heads([3, 0]).to_dense(), m[:, [3, 0]])
    assert torch.equal(idx.select_heads(2).to_dense(), m[:, 2:3])
    assert torch.equal(idx.select_rows(2, 5).to_dense(), m[:, :, 2:5])
    sk = idx.select_keys(3, 7)
    assert sk.num_k_blocks == 4
    assert torch.equal(sk.to_dense(), m[..., 3:7])
    assert torch.equal(idx.key_blocks_used(), m.any(dim=(0, 1, 2)))
    with pytest.raises(ValueError, match="out of range"):
        idx.select_rows(3, 7)
    with pytest.raises(ValueError, match="out of range"):
        idx.select_keys(-1, 2)


def test_digest():
    m = _rand_mask()
    a, b = BlockIndex.from_dense(m, 16), BlockIndex.from_dense(m.clone(), 16)
    assert a.digest() == b.digest() and a.equal(b)
    m2 = m.clone()
    m2[1, 2, 3, 4] = ~m2[1, 2, 3, 4]
    assert BlockIndex.from_dense(m2, 16).digest() != a.digest()


@pytest.mark.parametrize(
    "mask,msg,exc",
    [
        (torch.zeros(1, 2, 3, 4, dtype=torch.int32), "must be bool", TypeError),
        (torch.zeros(2, 3, 4, dtype=torch.bool), r"\[batch, heads, q_blocks, k_blocks\]", ValueError),
        ([[True]], "torch.Tensor", TypeError),
    ],
    ids=["int-mask", "3d-mask", "list"],
)
def test_from_dense_errors(mask, msg, exc):
    with pytest.raises(exc, match=msg):
        BlockIndex.from_dense(mask, 16)


def test_constructor_checks():
    with pytest.raises(ValueError, match="matching counts"):
        BlockIndex(torch.zeros(1, 2, 3, dtype=torch.int32), torch.zeros(1, 2, 4, 1, dtype=torch.int32), 16, 4)


def _row(entries, count, nk=6):
    idx = torch.full((1, 2, 3, 4), -1, dtype=torch.int32)
    cnt = torch.zeros(1, 2, 3, dtype=torch.int32)
    idx[0, 1, 2, :len(entries)] = torch.tensor(entries, dtype=torch.int32)
    cnt[0, 1, 2] = count
    return cnt, idx, nk


@pytest.mark.parametrize("entries,count,msg", [
    ([0, 3, 2], 3, "not strictly increasing"),
    ([1, 1], 2, "not strictly increasing"),
    ([0, 6], 2, r"outside \[0, 6\)"),
    ([-1], 1, r"outside \[0, 6\)"),
    ([0, 1], 5, r"count outside \[0, 4\]"),
    ([0], -1, r"count outside"),
], ids=["decreasing", "repeated", "too-large", "negative", "count-too-big", "count-negative"])
def test_constructor_rejects_bad_rows(entries, count, msg):
    cnt, idx, nk = _row(entries, count)
    with pytest.raises(ValueError, match=msg) as e:
        BlockIndex(cnt, idx, 16, nk)
    assert "batch 0, head 1, query block 2" in str(e.value)


def test_constructor_accepts_unused_garbage():
    # entries past the count are never read: anything there is fine
    cnt, idx, nk = _row([2, 5, 1, 0], 2)
    assert BlockIndex(cnt, idx, 16, nk).to_dense()[0, 1, 2].nonzero().flatten().tolist() == [2, 5]


def test_index_algebra_methods():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(2, 3, 6, 8, generator=g) < 0.5
    idx = BlockIndex.from_dense(m, 16)
    km = torch.tensor([-1, 0, 1, -1, -1, 2, 3, -1])
    want = m[..., [1, 2, 5, 6]]
    assert torch.equal(idx.remap_keys(km, 4).to_dense(), want)
    rows = torch.tensor([4, 0, 5])
    assert torch.equal(idx.select_rows_at(rows).to_dense(), m[:, :, rows])
    a, b = idx.select_rows(0, 2), idx.select_rows(2, 6)
    assert a.cat_rows(b).equal(idx)
    with pytest.raises(ValueError, match="not strictly increasing"):
        idx.remap_keys(torch.tensor([7, 6, 5, 4, 3, 2, 1, 0]), 8)  # a decreasing map breaks the rows
    with pytest.raises(ValueError, match="key_map must have shape"):
        idx.remap_keys(torch.arange(5), 5)
    with pytest.raises(ValueError, match="rows must be 1-D ids"):
        idx.select_rows_at(torch.tensor([6]))
    with pytest.raises(ValueError, match="incompatible"):
        a.cat_rows(idx.select_heads(0))
    with pytest.raises(TypeError, match="expected a BlockIndex"):
        a.cat_rows(m)


def test_cached_keeps_one_value_per_kind():
    idx = BlockIndex.full(1, 1, 2, 2, 16)
    calls = []

    def build(v):
        calls.append(v)
        return v

    assert idx.cached("mask", 1, lambda: build("a")) == "a"
    assert idx.cached("mask", 1, lambda: build("b")) == "a"  # hit: not rebuilt
    assert idx.cached("other", 1, lambda: build("c")) == "c"  # kinds are separate
    assert idx.cached("mask", 2, lambda: build("d")) == "d"  # new key replaces the old value
    assert idx.cached("mask", 1, lambda: build("e")) == "e"
    assert calls == ["a", "c", "d", "e"]
    assert "_token_mask_cache" not in vars(idx)


def test_flex_block_mask_conversion():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    m = _rand_mask(B=1, H=2, nq=4, nk=4)
    idx = BlockIndex.from_dense(m, 16)
    # ragged: last key block has 7 tokens, block 1 has 10 valid tokens (padded tile)
    kv_valid = torch.tensor([16, 10, 16, 16], dtype=torch.int32)
    bm = idx.to_block_mask(q_len=55, kv_len=55, kv_valid=kv_valid)
    assert isinstance(bm, flex.BlockMask)
    assert torch.equal(bm.to_dense().bool()[..., :4, :4], m)
    # token-level: FlexAttention with the converted mask equals our oracle
    from dist_compact.reference import reference_block_sparse_attention

    q, k, v = (torch.randn(1, 2, 55, 16, dtype=torch.float64) for _ in range(3))
    ref, lse = reference_block_sparse_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), idx, kv_valid=kv_valid
    )
    out = flex.flex_attention(q, k, v, block_mask=bm)
    rows = torch.isfinite(lse).transpose(1, 2).unsqueeze(-1).expand_as(ref)
    assert torch.allclose(out.transpose(1, 2)[rows], ref[rows], atol=1e-10)
