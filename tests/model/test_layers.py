import pytest
import torch

from model.attention import causal_attention
from model.config import CogVLMConfig
from model.expert_attention import VisionExpertAttention
from model.experts import routing_for
from model.rms_norm import RMSNorm
from model.rotary import apply_rotary, rotary_cos_sin, rotate_qk


def test_rmsnorm_multiplies_weight_in_fp32_before_the_cast():
    norm = RMSNorm(64, eps=1e-5).to(torch.bfloat16)
    norm.weight.data = (torch.randn(64) * 3).to(torch.bfloat16)
    x = (torch.randn(512, 64) * 7).to(torch.bfloat16)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
    weight_first = (norm.weight * normed).to(torch.bfloat16)
    cast_first = norm.weight * normed.to(torch.bfloat16)  # Llama-HF order, which CogVLM is not
    assert not torch.equal(weight_first, cast_first)  # the order matters on this input
    assert torch.equal(norm(x), weight_first)


def test_gqa_query_heads_share_kv_heads_in_consecutive_groups():
    q, k, v = torch.randn(5, 8, 16), torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    out = causal_attention(q, k, v).reshape(5, 8, 16)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    for head in range(8):
        kv_head = head // 4  # heads 0-3 read kv head 0, heads 4-7 kv head 1
        att = (q[:, head] @ k[:, kv_head].T / 4.0).masked_fill(~causal, float("-inf")).softmax(-1)
        torch.testing.assert_close(out[:, head], att @ v[:, kv_head])


def test_attention_of_the_last_tokens_sees_the_cached_prefix():
    q, k, v = torch.randn(7, 2, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    full = causal_attention(q, k, v)
    torch.testing.assert_close(causal_attention(q[4:], k, v), full[4:])


def test_rotary_is_neox_style_rotate_half():
    x = torch.randn(3, 2, 8)
    positions = torch.tensor([0, 1, 5])
    cos, sin = rotary_cos_sin(positions, 8, 10000.0, torch.float32)
    out = apply_rotary(x, cos, sin)
    torch.testing.assert_close(out[0], x[0])  # position 0: identity
    # pair (i, i + 4) rotates by angle pos * 10000^(-2i/8); check i = 1 at position 5
    angle = torch.tensor(5 * 10000 ** (-2 / 8))
    a, b = x[2, :, 1], x[2, :, 5]
    torch.testing.assert_close(out[2, :, 1], a * angle.cos() - b * angle.sin())
    torch.testing.assert_close(out[2, :, 5], b * angle.cos() + a * angle.sin())


@pytest.fixture
def v2_attention():
    from model.tiny_checkpoint import tiny_config

    cfg: CogVLMConfig = tiny_config(2, vocab_size=100)
    layer = VisionExpertAttention(cfg, layer_idx=0)
    torch.nn.init.normal_(layer.vision_expert_query_key_value.bias)
    return layer


class RecordingBackend:
    def attend(self, layer_idx, q, k, v, cos_sin):
        q, k = rotate_qk(q, k, cos_sin)
        self.q, self.k, self.v = q, k, v
        return causal_attention(q, k, v)


def test_v2_vision_qkv_bias_applies_to_vision_rows_only(v2_attention):
    assert v2_attention.language_expert_query_key_value.bias is None
    hidden = torch.randn(6, 64)
    mask = torch.tensor([False, True, True, True, False, False])
    cos_sin = rotary_cos_sin(torch.zeros(6, dtype=torch.long), 16, 500000.0, torch.float32)  # no rotation
    with_bias, without_bias = RecordingBackend(), RecordingBackend()
    v2_attention(hidden, cos_sin, routing_for(mask), with_bias)
    with torch.no_grad():
        v2_attention.vision_expert_query_key_value.bias.zero_()
    v2_attention(hidden, cos_sin, routing_for(mask), without_bias)
    delta = (with_bias.v - without_bias.v).abs().sum(dim=(1, 2))  # [T]
    assert (delta[mask] > 0).all() and (delta[~mask] == 0).all()


def test_dense_path_equals_all_language_mask(v2_attention):
    hidden = torch.randn(4, 64)
    cos_sin = rotary_cos_sin(torch.arange(4), 16, 500000.0, torch.float32)
    dense = v2_attention(hidden, cos_sin, None, RecordingBackend())
    routed = v2_attention(hidden, cos_sin, routing_for(torch.zeros(4, dtype=torch.bool)), RecordingBackend())
    torch.testing.assert_close(dense, routed)
