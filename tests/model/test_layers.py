import pytest
import torch

from model.attention import causal_attention
from model.config import CogVLMConfig
from model.expert_attention import VisionExpertAttention
from model.experts import routing_for
from model.rms_norm import RMSNorm
from model.rotary import apply_rotary, cos_sin_at, rotary_cos_sin, rotary_table, rotate_qk


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rotary_table_holds_each_positions_cos_and_sin_bit_for_bit(dtype):
    table = rotary_table(4096, 64, 500000.0, dtype, torch.device("cpu"))
    positions = torch.tensor([0, 1, 2, 2, 2, 3, 4, 1500, 4095])  # an image's span repeats a position
    cos, sin = cos_sin_at(table, positions)
    want_cos, want_sin = rotary_cos_sin(positions, 64, 500000.0, dtype)
    assert cos.shape == want_cos.shape == (9, 1, 64) and cos.stride() == sin.stride()
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    assert not torch.equal(cos, sin)  # the two halves of a row are not mixed up


def test_the_model_looks_rotary_up_in_its_table_with_the_same_logits(monkeypatch):
    from model.attention import ContiguousKVCache
    from model.cogvlm import CogVLMForCausalLM
    from model.tiny_checkpoint import tiny_config

    cfg = tiny_config(2, vocab_size=100)
    torch.manual_seed(0)
    model = CogVLMForCausalLM(cfg).eval()
    ids, positions = torch.randint(0, 100, (9,)), torch.tensor([0, 1, 2, 2, 2, 3, 4, 5, 6])

    def logits():
        cache = ContiguousKVCache(cfg.num_layers, 9, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
        with torch.inference_mode():
            return model.compute_logits(model(model.embed(ids), positions, None, cache))

    looked_up = logits()
    table = model._rotary_table
    assert table is not None and table.shape == (cfg.max_position_embeddings, 2, cfg.head_dim)
    per_step = lambda pos, dtype: rotary_cos_sin(pos, cfg.head_dim, cfg.rope_theta, dtype)  # noqa: E731
    monkeypatch.setattr(model, "rotary_cos_sin", per_step)
    assert torch.equal(looked_up, logits())


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
