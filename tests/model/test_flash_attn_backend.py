"""The flash_attn backend with the real flash-attn (the [gpu] extra; neither this CPU machine nor
the lent GPU's image has it, so this runs where a user installs it). The CPU tests of its calls,
through a stand-in that checks flash-attn's contract, are in tests/server/test_engine.py."""

import pytest
import torch

from model.paged_attention import PagedAttentionMetadata, PagedKVCache, TorchPagedAttention, make_attention_backend
from model.rotary import rotary_cos_sin


@pytest.mark.gpu
@pytest.mark.parametrize("query_lens, seq_lens", [([1, 1, 1], [300, 17, 1]), ([40, 1, 7], [40, 600, 263])])
def test_flash_attn_backend_matches_the_torch_backend(query_lens, seq_lens):
    pytest.importorskip("flash_attn")
    device, dtype, heads, kv_heads, head_dim, block = torch.device("cuda"), torch.float16, 8, 2, 128, 256
    caches = [PagedKVCache(1, 12, block, kv_heads, head_dim, dtype, device) for _ in range(2)]
    for c in caches[1:]:  # the same cached prefix in both
        c.k[0].copy_(caches[0].k[0].normal_())
        c.v[0].copy_(caches[0].v[0].normal_())
    tables = torch.randperm(12)[:9].view(3, 3).to(device)  # 3 blocks each, none shared
    positions = torch.cat([torch.arange(s - q, s) for q, s in zip(query_lens, seq_lens, strict=True)]).to(device)
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor(query_lens)).to(device)  # [T] sequence of each token
    slots = tables[owner, positions // block] * block + positions % block
    meta = PagedAttentionMetadata(slots, query_lens, seq_lens, tables)
    num_tokens = sum(query_lens)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    cos_sin = rotary_cos_sin(positions, head_dim, 10000.0, dtype)
    outs = []
    for backend in (make_attention_backend("flash_attn", caches[0], device), TorchPagedAttention(caches[1])):
        q, k, v = qkv.clone().split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        backend.prepare(meta)
        outs.append(backend.attend(0, q.view(num_tokens, heads, head_dim), k.view(num_tokens, kv_heads, head_dim),
                                   v.view(num_tokens, kv_heads, head_dim), cos_sin))  # fmt: skip
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(caches[0].k[0], caches[1].k[0], rtol=2e-3, atol=2e-3)  # rotated K, same slots
    torch.testing.assert_close(caches[0].v[0], caches[1].v[0], rtol=0, atol=0)
