"""EVA2-CLIP-E vision tower, CogVLM2's 2x2 conv, the GLU adapter and boi/eoi (COGVLM.md section 6).

Module and parameter names are the checkpoints' (`model.vision.*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import CogVLMConfig, VisionConfig


class PatchEmbedding(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(vc.in_channels, vc.hidden_size, kernel_size=vc.patch_size, stride=vc.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, vc.hidden_size))
        self.position_embedding = nn.Embedding(vc.num_positions, vc.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, 1 + P, D]
        x = self.proj(pixels).flatten(2).transpose(1, 2)  # [B, P, D], row-major patches
        cls = self.cls_embedding.expand(x.shape[0], -1, -1)  # [B, 1, D]
        return torch.cat((cls, x), dim=1) + self.position_embedding.weight[None]


class Attention(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.num_heads = vc.num_heads
        self.query_key_value = nn.Linear(vc.hidden_size, 3 * vc.hidden_size)
        self.dense = nn.Linear(vc.hidden_size, vc.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D]
        batch, length, _ = x.shape
        qkv = self.query_key_value(x).reshape(batch, length, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, hd]
        # Full attention, scale hd^-0.5: the reference's xformers call, up to rounding.
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, hd]
        return self.dense(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(vc.hidden_size, vc.intermediate_size)
        self.fc2 = nn.Linear(vc.intermediate_size, vc.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact-erf GELU


class TransformerLayer(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.attention = Attention(vc)
        self.mlp = MLP(vc)
        self.post_attention_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: EVA2 normalises the sublayer OUTPUT, before the residual add (not pre-norm).
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(vc) for _ in range(vc.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    """Adapter from the tower's width to the language model's: LN eps is nn.LayerNorm's default 1e-5."""

    def __init__(self, in_features: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.dense_h_to_4h = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class VisionTower(nn.Module):
    """pixels [B, 3, S, S] -> [B, num_image_tokens, hidden]: boi, adapted patches, eoi."""

    def __init__(self, cfg: CogVLMConfig):
        super().__init__()
        vc = cfg.vision
        self.grid_size = vc.grid_size
        self.patch_embedding = PatchEmbedding(vc)
        self.transformer = Transformer(vc)
        self.linear_proj = GLU(vc.hidden_size, cfg.hidden_size, cfg.intermediate_size)
        if vc.has_conv:
            self.conv = nn.Conv2d(vc.hidden_size, vc.hidden_size, kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.patch_embedding(pixels))[:, 1:]  # drop cls: [B, P, Dv]
        if hasattr(self, "conv"):
            batch, _, width = x.shape
            grid = x.reshape(batch, self.grid_size, self.grid_size, width).permute(0, 3, 1, 2)  # [B, Dv, g, g]
            x = self.conv(grid).flatten(2).transpose(1, 2)  # [B, P / 4, Dv]
        x = self.linear_proj(x)  # [B, P', hidden]
        batch = x.shape[0]
        return torch.cat((self.boi.expand(batch, -1, -1), x, self.eoi.expand(batch, -1, -1)), dim=1)
