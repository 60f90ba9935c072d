from __future__ import annotations

import torch
from torch import nn

from kernels.expert_routing import ExpertRouting, from_slots, to_slots
from model.attention import AttentionBackend
from model.config import CogVLMConfig
from model.experts import routed_linear


class VisionExpertAttention(nn.Module):
    """Self-attention whose QKV and output projections are routed per token to the language or
    the vision expert (COGVLM.md section 5). Parameter names match the checkpoints."""

    def __init__(self, cfg: CogVLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.language_expert_query_key_value = nn.Linear(cfg.hidden_size, cfg.qkv_size, bias=False)
        self.vision_expert_query_key_value = nn.Linear(cfg.hidden_size, cfg.qkv_size, bias=cfg.vision_qkv_bias)
        self.language_expert_dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.vision_expert_dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]; [num_slots, hidden] when routing.in_slots
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # 2 x [T, 1, head_dim]
        routing: ExpertRouting | None,  # rows by expert; None: no vision token in the batch
        attention: AttentionBackend,
    ) -> torch.Tensor:  # [T, hidden]; [num_slots, hidden] when routing.in_slots
        qkv = routed_linear(hidden, routing, self.language_expert_query_key_value, self.vision_expert_query_key_value)
        in_slots = routing is not None and routing.in_slots
        if in_slots:  # attention reads each sequence's rows in order: the one place rows leave slot order
            qkv = from_slots(qkv, routing)  # [T, q + 2 kv]
        ctx = self.attend(qkv, cos_sin, attention)  # [T, H * D]
        if in_slots:
            ctx = to_slots(ctx, routing)  # [num_slots, H * D]
        return routed_linear(ctx, routing, self.language_expert_dense, self.vision_expert_dense)

    def attend(
        self,
        qkv: torch.Tensor,  # [T, q + 2 kv]: the QKV projection's output
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attention: AttentionBackend,
    ) -> torch.Tensor:  # [T, H * D], before the output projection
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)  # [Q | K | V], head-major
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D], strided views of qkv
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, KV, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return attention.attend(self.layer_idx, q, k, v, cos_sin)  # rotary applied there
