"""The small fused kernels of the decode path (RMSNorm + residual, rotary, silu * up) against the
eager torch they replace (interpreter on CPU, compiled on GPU). The error bound is the issue's:
at most 2x plain torch's own error against fp32, at the same dtype."""

import pytest
import torch
import torch.nn.functional as F

from kernels.activation import silu_and_mul
from kernels.rms_norm import rms_norm, rms_norm_ref
from kernels.rotary import rotary_and_write_kv_, rotary_embedding_
from model.rotary import apply_rotary, rotary_cos_sin
from tests.kernels.error_bound import DEVICE, DTYPES, check_close


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens, hidden", [(1, 64), (7, 200), (33, 4096)])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_eager(dtype, num_tokens, hidden, with_residual):
    x = (torch.randn(num_tokens, hidden) * 3).to(DEVICE, dtype)
    weight = (1 + torch.randn(hidden) * 0.1).to(DEVICE, dtype)
    residual = torch.randn(num_tokens, hidden).to(DEVICE, dtype) if with_residual else None
    out, summed = rms_norm(x, weight, 1e-5, residual)
    want, want_sum = rms_norm_ref(x, weight, 1e-5, residual)
    exact, _ = rms_norm_ref(x.double(), weight.double(), 1e-5, None if residual is None else residual.double())
    check_close(out, exact.float(), want)
    if with_residual:
        assert torch.equal(summed, want_sum)  # the residual stream is rounded exactly as eager's add
    else:
        assert summed is None


def test_rms_norm_reads_strided_rows_and_refuses_bad_shapes():
    x = torch.randn(5, 128, device=DEVICE)[:, :64]  # rows 128 apart
    weight = torch.rand(64, device=DEVICE)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6)[0], rms_norm_ref(x, weight, 1e-6)[0])
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.rand(63, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, weight, 1e-6, residual=torch.randn(5, 32, device=DEVICE))
    assert rms_norm(x[:0], weight, 1e-6)[0].shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens, heads, head_dim", [(1, (4, 4), 32), (9, (8, 2), 64), (40, (4, 1), 128)])
def test_rotary_in_place_on_qkv_views_matches_eager(dtype, num_tokens, heads, head_dim):
    num_heads, num_kv_heads = heads
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(DEVICE, dtype)
    positions = torch.randint(0, 4000, (num_tokens,), device=DEVICE)
    cos, sin = rotary_cos_sin(positions, head_dim, 10000.0, dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim)
    want_q, want_k, v_before = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.clone()
    exact_q, exact_k = (apply_rotary(t.double(), cos.double(), sin.double()).float() for t in (q, k))
    rotary_embedding_(q, k, cos, sin)
    check_close(q, exact_q, want_q)
    check_close(k, exact_k, want_k)
    assert torch.equal(v, v_before)  # v is not touched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens, heads, head_dim", [(1, (4, 4), 32), (9, (8, 2), 64)])
def test_rotary_and_kv_write_puts_rotated_k_and_v_in_their_slots(dtype, num_tokens, heads, head_dim):
    """One launch: q rotated in place; rotated k and v into scattered cache slots; k, v untouched."""
    num_heads, num_kv_heads = heads
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(DEVICE, dtype)
    positions = torch.randint(0, 4000, (num_tokens,), device=DEVICE)
    cos, sin = rotary_cos_sin(positions, head_dim, 10000.0, dtype)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1))  # fmt: skip
    want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    exact_q, exact_k = (apply_rotary(t.double(), cos.double(), sin.double()).float() for t in (q, k))
    k_before, v_before = k.clone(), v.clone()
    k_cache, v_cache = (torch.zeros(6, 16, num_kv_heads, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    slots = torch.randperm(96, device=DEVICE)[:num_tokens]
    rotary_and_write_kv_(q, k, v, cos, sin, k_cache, v_cache, slots)
    check_close(q, exact_q, want_q)
    cached_k, cached_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    check_close(cached_k[slots], exact_k, want_k)
    assert torch.equal(cached_v[slots], v_before)
    untouched = torch.ones(96, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert not cached_k[untouched].any() and not cached_v[untouched].any()  # only the slots are written
    assert torch.equal(k, k_before) and torch.equal(v, v_before)
    with pytest.raises(ValueError, match="slot_mapping"):
        rotary_and_write_kv_(q, k, v, cos, sin, k_cache, v_cache, slots[:0])
    with pytest.raises(ValueError, match="k_cache"):
        rotary_and_write_kv_(q, k, v, cos, sin, k_cache.transpose(0, 1), v_cache, slots)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 200), (5, 11008), (64, 1000)])
def test_silu_and_mul_matches_eager(dtype, shape):
    gate = (torch.randn(shape) * 4).to(DEVICE, dtype)
    up = torch.randn(shape).to(DEVICE, dtype)
    want = F.silu(gate) * up
    exact = F.silu(gate.double()) * up.double()
    check_close(silu_and_mul(gate, up), exact.float(), want)
    gate_up = torch.cat([gate, up], dim=1)  # the fused GEMM's output: halves with strided rows
    assert torch.equal(silu_and_mul(gate_up[:, : shape[1]], gate_up[:, shape[1] :]), silu_and_mul(gate, up))
    with pytest.raises(ValueError, match="contiguous"):
        silu_and_mul(gate[:, ::2], up[:, ::2])
