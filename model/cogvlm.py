"""The CogVLM language model with visual experts, over flat (unpadded) token batches.

Tokens of a batch are one flat [T] axis; the attention backend knows where sequences start
and end. Module names follow the checkpoints, so `state_dict()` keys are theirs.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.expert_routing import from_slots, to_slots
from kernels.gemv import gemv, rms_norm_gemv, silu_and_mul_gemv
from kernels.tma import has_tma
from model.attention import AttentionBackend
from model.config import CogVLMConfig
from model.dispatch import use_triton
from model.expert_attention import VisionExpertAttention
from model.expert_mlp import VisionExpertMLP
from model.experts import routing_for
from model.rms_norm import RMSNorm
from model.rotary import cos_sin_at, rotary_table
from model.vision import VisionTower

# Which of a batch-1 layer's one-row GEMVs let the next kernel launch right after their PDL wait
# instead of after their K loop (kernels/gemv.py, _launch). On an H200, 17B batch-1 steps: all four
# early cost 0.21 ms (3.78 -> 3.99 replayed); dense, gate_up and down +0.06; dense and down, against
# none in the same run, -0.02 ms a step (eleventh session), -0.03 (twelfth, first run) and -0.02 or
# +0.03 against the second run's two defaults: within the noise of the GEMV autotuner's picks, kept.
EARLY_TRIGGER: frozenset[str] = frozenset({"dense", "down"})  # of "qkv", "dense", "gate_up", "down"
# Which of them first ask L2 for their weight rows (kernels/gemv.py, prefetch: 64 KB a program, all
# of a 4096-wide projection's). The attention
# output projection follows the split decode, which reads little from HBM for 7 to 10 us a layer
# (an H200, twelfth session; 1.2 MB of K/V at 71 tokens); under PDL its programs are resident then,
# so its 32 MiB (17B; 4.27 TB/s streams that in 7.9 us) start towards L2 while attention runs. After
# a GEMV the HBM is already busy: the others stream as before. On an H200 (nineteenth session) it
# changed nothing measurable: a 17B step read 3.64 ms with it and 3.63 without (bench_decode.py's
# "no L2 prefetch" mode, same run); on all four GEMVs it cost 0.35 ms (3.99). It stays on because
# kernels/gemv.py's TUNED configs were picked and timed with it.
L2_PREFETCH: frozenset[str] = frozenset({"dense"})


class DecoderLayer(nn.Module):
    def __init__(self, cfg: CogVLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = VisionExpertAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = VisionExpertMLP(cfg.hidden_size, cfg.intermediate_size)
        self.one_row_gemv = False  # see CogVLMForCausalLM.fuse_for_inference
        self.pdl = False

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]: the previous layer's MLP output (layer 0: the embeddings)
        residual: torch.Tensor | None,  # [T, hidden]: the sum before it; None in layer 0
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        routing,
        attention: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (this MLP's output, the sum before it)
        # NOTE: each residual add is fused into the next norm (one kernel on CUDA instead of
        # nine); the sums are the eager `hidden = hidden + sublayer(norm(hidden))`, same rounding.
        if self.takes_one_row(hidden, routing is not None):
            return self._forward_one_text_row(hidden, residual, cos_sin, attention)
        if residual is None:
            normed, residual = self.input_layernorm(hidden), hidden
        else:
            normed, residual = self.input_layernorm(hidden, residual)
        attn = self.self_attn(normed, cos_sin, routing, attention)
        normed, residual = self.post_attention_layernorm(attn, residual)
        return self.mlp(normed, routing), residual

    def takes_one_row(self, hidden: torch.Tensor, has_vision: bool) -> bool:
        """Whether this step runs the one-row GEMV path: a batch-1 text decode (fuse_for_inference)."""
        return self.one_row_gemv and not has_vision and hidden.shape[0] == 1 and use_triton(hidden)

    def _forward_one_text_row(self, hidden, residual, cos_sin, attention):
        """A batch-1 text decode through kernels/gemv.py: each norm, and silu * up, runs in the
        prologue of the projection after it, so the layer's four projections take four launches
        where eight to ten ran (norms, silu * up, cuBLAS's split-K reduces). Same math and
        rounding points as forward() on the dense path."""
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv_weight = attn.language_expert_query_key_value.weight
        pdl, early, ask = self.pdl, EARLY_TRIGGER, L2_PREFETCH
        qkv, summed = rms_norm_gemv(hidden, residual, norm1.weight, norm1.eps, qkv_weight, pdl, "qkv" in early,
                                    prefetch="qkv" in ask)  # fmt: skip
        residual = hidden if residual is None else summed
        ctx = attn.attend(qkv, cos_sin, attention)  # [1, H * D]
        attn_out = gemv(ctx.contiguous(), attn.language_expert_dense.weight, pdl, "dense" in early,
                        prefetch="dense" in ask)  # fmt: skip
        gate_up, residual = rms_norm_gemv(attn_out, residual, norm2.weight, norm2.eps, mlp.language_gate_up, pdl,
                                          "gate_up" in early, prefetch="gate_up" in ask)  # fmt: skip
        down = silu_and_mul_gemv(gate_up, mlp.language_mlp.down_proj.weight, pdl, "down" in early,
                                 prefetch="down" in ask)  # fmt: skip
        return down, residual


class CogVLMModel(nn.Module):
    def __init__(self, cfg: CogVLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.vision = VisionTower(cfg)


class CogVLMForCausalLM(nn.Module):
    def __init__(self, cfg: CogVLMConfig):
        super().__init__()
        self.config = cfg
        self.model = CogVLMModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # rotary_table's, built on first use on the positions' device; not a buffer, so the
        # state_dict keys stay the checkpoint's
        self._rotary_table: torch.Tensor | None = None
        self.grouped_expert_rows = False  # see use_grouped_expert_rows

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, num_image_tokens, hidden]: what fills the image slots."""
        return self.model.vision(pixels.to(self.dtype))

    def embed(
        self,
        input_ids: torch.Tensor,  # [T]
        image_embeds: torch.Tensor | None = None,  # [N, hidden]: features for N image slots
        image_slot_ids: torch.Tensor | None = None,  # [N]: rows of the batch those slots are
    ) -> torch.Tensor:  # [T, hidden]
        embeds = self.model.embed_tokens(input_ids)
        if image_embeds is not None:
            embeds[image_slot_ids] = image_embeds.to(embeds.dtype)
        return embeds

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [T, hidden]
        position_ids: torch.Tensor,  # [T]
        vision_mask: torch.Tensor | None,  # [T] bool, the shifted rule; None: no vision token
        attention: AttentionBackend,
    ) -> torch.Tensor:  # [T, hidden], after the final norm
        return self.model.norm(*self._layers(inputs_embeds, position_ids, vision_mask, attention))[0]

    def forward_logits(
        self,
        inputs_embeds: torch.Tensor,  # [T, hidden]
        position_ids: torch.Tensor,  # [T]
        vision_mask: torch.Tensor | None,  # [T] bool; None: no vision token
        attention: AttentionBackend,
    ) -> torch.Tensor:  # [T, vocab] fp32: compute_logits(forward(...))
        """A batch-1 text decode on the one-row GEMV path (fuse_for_inference) runs the final norm
        in the lm_head GEMV's prologue and writes fp32 logits: one launch where the norm, cuBLAS's
        GEMM and the cast ran three (about 0.07 ms of a 3.8 ms CogVLM-17B step on an H200)."""
        hidden, residual = self._layers(inputs_embeds, position_ids, vision_mask, attention)
        last = self.model.layers[-1]
        if last.takes_one_row(hidden, vision_mask is not None):
            norm = self.model.norm
            return rms_norm_gemv(hidden, residual, norm.weight, norm.eps, self.lm_head.weight, last.pdl,
                                 out_dtype=torch.float32)[0]  # fmt: skip
        return self.compute_logits(self.model.norm(hidden, residual)[0])

    def _layers(self, inputs_embeds, position_ids, vision_mask, attention) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers: the last one's output and the residual sum before it (the final norm adds them)."""
        cos_sin = self.rotary_cos_sin(position_ids, inputs_embeds.dtype)
        routing = routing_for(vision_mask, self.grouped_expert_rows)
        in_slots = routing is not None and routing.in_slots
        hidden, residual = (to_slots(inputs_embeds, routing) if in_slots else inputs_embeds), None
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual, cos_sin, routing, attention)
        if in_slots:  # rows back in batch order for the final norm and the logits
            hidden, residual = from_slots(hidden, routing), from_slots(residual, routing)
        return hidden, residual

    def rotary_cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """2 x [T, 1, head_dim], looked up in a table of max_position_embeddings rows: callers keep
        positions below it (the engine's max_model_len and generate_reference's are at most that)."""
        cfg = self.config
        table = self._rotary_table
        if table is None or table.device != position_ids.device or table.dtype != dtype:
            table = rotary_table(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta, dtype, position_ids.device)
            self._rotary_table = table
        return cos_sin_at(table, position_ids)

    def fuse_for_inference(self, one_row_gemv: bool = False, pdl: bool = False) -> None:
        """Weight layouts for the fast paths (see VisionExpertMLP.fuse_language_gate_up); with
        one_row_gemv, batch-1 text decodes take DecoderLayer._forward_one_text_row, whose GEMVs
        launch as programmatic dependent launches with pdl (kernels/pdl.py)."""
        for layer in self.model.layers:
            layer.mlp.fuse_language_gate_up()
            layer.one_row_gemv = one_row_gemv
            layer.pdl = pdl

    def use_grouped_expert_rows(self, on: bool) -> None:
        """Whether a forward with vision rows carries its hidden states through the layers in the
        routing's slot order (kernels/expert_routing.py): language rows, then vision rows, each
        region padded to a multiple of 256. Every tile of a routed projection is then one run of
        rows (kernels/grouped_expert_linear.py: TMA loads only, so Triton warp-specialises its loop
        on Hopper), where kernels/expert_linear.py gathers the rows of the tiles that straddle
        two runs through an index. The cost: two gathers a layer around attention, which reads
        each sequence's rows in order, and one each at the embedding and the final norm; the
        norms and residual adds run over the padding slots too (1536 slots for a one-image
        batch of 1267 rows). Slots of tiles with no row are never written by the grouped kernel
        and hold whatever the allocator left: every op between to_slots and from_slots is
        row-wise, so no result reads them. Decode steps (no vision row) never take it.

        The grouped kernel reads through TMA: on CUDA, sm_90 or later (on CPU the references run)."""
        if on and self.device.type == "cuda" and not has_tma(self.device):
            name = torch.cuda.get_device_name(self.device)
            raise ValueError(f"--expert-rows grouped needs a GPU with TMA (sm_90 or later); {name} has none")
        self.grouped_expert_rows = on

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] fp32
        return self.lm_head(hidden).float()
