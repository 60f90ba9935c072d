"""An independent, deliberately naive CogVLM written from COGVLM.md alone: state-dict tensors,
explicit attention matrices, both experts computed and selected per row, full recompute.
It shares no code with model/ and checks it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rmsnorm(x, w, eps):
    x32 = x.float()
    return (w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def rope(x, positions, theta):  # x [T, H, D]
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = positions.float()[:, None] * inv[None]  # [T, D/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def routed(x, mask, sd, prefix_lang, prefix_vis):
    lang = x @ sd[prefix_lang + ".weight"].T
    vis = x @ sd[prefix_vis + ".weight"].T
    if prefix_vis + ".bias" in sd:
        vis = vis + sd[prefix_vis + ".bias"]
    return torch.where(mask[:, None], vis, lang)


def vision_tower(sd, cfg, pixels):  # [3, S, S] -> [N_img, hidden]
    v, vc = "model.vision.", cfg.vision
    x = F.conv2d(
        pixels[None],
        sd[v + "patch_embedding.proj.weight"],
        sd[v + "patch_embedding.proj.bias"],
        stride=vc.patch_size,
    )
    x = x.flatten(2)[0].T  # [P, Dv]
    x = torch.cat([sd[v + "patch_embedding.cls_embedding"], x]) + sd[v + "patch_embedding.position_embedding.weight"]
    heads, hd = vc.num_heads, vc.hidden_size // vc.num_heads
    for layer in range(vc.num_layers):
        p = f"{v}transformer.layers.{layer}."
        qkv = x @ sd[p + "attention.query_key_value.weight"].T + sd[p + "attention.query_key_value.bias"]
        q, k, u = qkv.reshape(-1, 3, heads, hd).unbind(1)  # [L, H, hd]
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        ctx = torch.einsum("hqk,khd->qhd", att.softmax(-1), u).reshape(len(x), -1)
        out = ctx @ sd[p + "attention.dense.weight"].T + sd[p + "attention.dense.bias"]
        norm = sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"]
        x = x + F.layer_norm(out, (vc.hidden_size,), *norm, eps=vc.layer_norm_eps)
        h = F.gelu(x @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        h = h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        norm = sd[p + "post_attention_layernorm.weight"], sd[p + "post_attention_layernorm.bias"]
        x = x + F.layer_norm(h, (vc.hidden_size,), *norm, eps=vc.layer_norm_eps)
    x = x[1:]
    if cfg.generation == 2:
        g = vc.grid_size
        grid = x.T.reshape(1, -1, g, g)  # patches are row-major
        x = F.conv2d(grid, sd[v + "conv.weight"], sd[v + "conv.bias"], stride=2).flatten(2)[0].T
    a = v + "linear_proj."
    y = x @ sd[a + "linear_proj.weight"].T
    y = F.gelu(F.layer_norm(y, (cfg.hidden_size,), sd[a + "norm1.weight"], sd[a + "norm1.bias"], eps=1e-5))
    y = (F.silu(y @ sd[a + "gate_proj.weight"].T) * (y @ sd[a + "dense_h_to_4h.weight"].T)) @ sd[
        a + "dense_4h_to_h.weight"
    ].T
    return torch.cat([sd[v + "boi"][0], y, sd[v + "eoi"][0]])


def naive_logits(sd, cfg, input_ids, token_types, pixels=None):
    """Logits [T, vocab] for one sequence, from scratch."""
    n = len(input_ids)
    x = sd["model.embed_tokens.weight"][torch.tensor(input_ids)]
    image_rows = [i for i, t in enumerate(token_types) if t == 1]
    if image_rows:
        x = x.clone()
        x[image_rows[0] : image_rows[-1] + 1] = vision_tower(sd, cfg, pixels)
    # one image right after BOS: positions 0, 1, 2..2, 3, 4, ...
    if image_rows:
        n_img = len(image_rows)
        pos = [0, 1] + [2] * (n_img - 2) + list(range(3, 3 + n - n_img))  # eoi, text
    else:
        pos = list(range(n))
    positions = torch.tensor(pos)
    mask = torch.tensor([token_types[i] == 1 and i + 1 < n and token_types[i + 1] == 1 for i in range(n)])
    hd, heads, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        h = rmsnorm(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        qkv = routed(
            h,
            mask,
            sd,
            p + "self_attn.language_expert_query_key_value",
            p + "self_attn.vision_expert_query_key_value",
        )
        q = rope(qkv[:, : heads * hd].reshape(n, heads, hd), positions, cfg.rope_theta)
        k = rope(qkv[:, heads * hd : (heads + kv) * hd].reshape(n, kv, hd), positions, cfg.rope_theta)
        u = qkv[:, (heads + kv) * hd :].reshape(n, kv, hd)
        ctx = torch.empty(n, heads, hd)
        for head in range(heads):
            g = head // (heads // kv)  # GQA: consecutive query heads share one kv head
            att = (q[:, head] @ k[:, g].T) / math.sqrt(hd)
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)
            ctx[:, head] = att @ u[:, g]
        x = x + routed(
            ctx.reshape(n, -1),
            mask,
            sd,
            p + "self_attn.language_expert_dense",
            p + "self_attn.vision_expert_dense",
        )
        h = rmsnorm(x, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        lm, vm = p + "mlp.language_mlp.", p + "mlp.vision_mlp."
        gate = routed(h, mask, sd, lm + "gate_proj", vm + "gate_proj")
        up = routed(h, mask, sd, lm + "up_proj", vm + "up_proj")
        x = x + routed(F.silu(gate) * up, mask, sd, lm + "down_proj", vm + "down_proj")
    x = rmsnorm(x, sd["model.norm.weight"], cfg.rms_norm_eps)
    return (x @ sd["lm_head.weight"].T).float()


def naive_greedy(sd, cfg, input_ids, token_types, pixels, max_tokens):
    ids, types, out = list(input_ids), list(token_types), []
    for _ in range(max_tokens):
        token = int(naive_logits(sd, cfg, ids, types, pixels)[-1].argmax())
        out.append(token)
        if token in cfg.eos_token_ids:
            break
        ids.append(token)
        types.append(0)
    return out
