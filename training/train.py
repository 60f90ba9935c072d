"""Train the embedded default model: a tiny CogVLM (generation-1 layout: EVA-style tower, GLU
adapter, visual experts in every layer, the shifted expert mask, shared image position ids) on
synthetic shapes, on CPU, within a time budget. Writes an HF-layout checkpoint (config.json,
model.safetensors, sentencepiece tokenizer) and a loss curve.

    python -m training.train --out models/cogvlm-tiny-shapes --minutes 28
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from model.cogvlm import CogVLMForCausalLM
from model.config import CogVLMConfig, VisionConfig
from model.processor import Conversation, Processor, load_tokenizer, prompt_text, vision_expert_mask
from model.rotary import rotate_qk
from model.tiny_checkpoint import write_sentencepiece_tokenizer
from training.shapes_dataset import (
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    TASK_WEIGHTS,
    Sample,
    Shape,
    box_text,
    corpus,
    make_sample,
)

PATCH_SIZE = 14  # 112 px images -> an 8 x 8 grid of patches


@dataclass(frozen=True)
class TrainConfig:
    out: str = "models/cogvlm-tiny-shapes"
    steps: int = 6800  # an upper bound: the budget below stops the shipped run at 4487 steps (one thread)
    minutes: float = 28.0  # wall-clock budget for the optimisation loop
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 1  # a second thread makes a step only 1.4x faster (329 -> 230 ms) and takes the other core
    vocab_size: int = 512
    aux_weight: float = 1.0  # per-patch supervision of the image features (0: off); see PatchHeads
    aux_digits: bool = True  # ... including the box's digits as the grounding answer writes them
    subject_weight: float = 1.0  # supervision of where the question's named shapes are (0: off); see SubjectHeads
    task_weights: tuple[float, ...] = TASK_WEIGHTS  # caption, vqa, grounding
    hidden_size: int = 128  # the language model's width (the tower's stays 128)
    num_layers: int = 4
    num_heads: int = 4
    device: str = "cpu"  # "cuda" for quick experiments; the shipped checkpoint is trained on CPU
    eval_per_task: int = 0  # held-out samples per task scored on the reference path after training


def model_config(vocab_size: int, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4) -> CogVLMConfig:
    """About 2 M parameters: 112 px images in 14 px patches -> 64 patches -> 66 image tokens."""
    vision = VisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=128, num_layers=3, num_heads=4,
                          intermediate_size=256)  # fmt: skip
    return CogVLMConfig(generation=1, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_heads,
                        max_position_embeddings=512, template_version="chat", torch_dtype="bfloat16",
                        vision=vision)  # fmt: skip


@dataclass
class Encoded:
    input_ids: list[int]
    token_types: list[int]
    positions: list[int]
    loss_from: int  # positions >= loss_from - 1 predict answer tokens
    pixels: torch.Tensor
    patches: PatchTargets
    subjects: SubjectTargets


def encode(processor: Processor, sample: Sample) -> Encoded | None:
    """The prompt exactly as the server builds it, then ' answer' and eos. None if the answer's
    tokens do not continue the prompt's (the tokenizer merged across the boundary)."""
    inputs = processor.build(Conversation(query=sample.question, image=sample.image), sample.template)
    text = prompt_text(sample.question, (), sample.template)
    tokenizer = processor.tokenizer
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    full_ids = tokenizer.encode(f"{text} {sample.answer}", add_special_tokens=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        return None
    answer = full_ids[len(prompt_ids) :] + [processor.cfg.eos_token_ids[0]]
    last = inputs.position_ids[-1]
    return Encoded(
        input_ids=inputs.input_ids + answer,
        token_types=inputs.token_type_ids + [0] * len(answer),
        positions=inputs.position_ids + [last + 1 + i for i in range(len(answer))],
        loss_from=inputs.num_tokens,
        pixels=inputs.pixels,
        patches=patch_targets(sample.shapes),
        subjects=subject_targets(sample.subjects),
    )


def box_digits(shape: Shape) -> torch.Tensor:  # [12] long
    """The twelve digits of the shape's box as the grounding answer writes them."""
    return torch.tensor([int(c) for c in box_text(shape.box) if c.isdigit()])


def covered_patches(shape: Shape, grid: int) -> torch.Tensor:  # [P] bool, row-major
    """The patches whose centre lies inside the shape's box."""
    centres = (torch.arange(grid, dtype=torch.float) + 0.5) * PATCH_SIZE
    cy, cx = centres[:, None].expand(grid, grid).flatten(), centres[None, :].expand(grid, grid).flatten()
    return (cx >= shape.box[0]) & (cx < shape.box[2]) & (cy >= shape.box[1]) & (cy < shape.box[3])


@dataclass
class PatchTargets:
    """What each of the 8 x 8 patches shows: the shape whose box holds the patch's centre."""

    color: torch.Tensor  # [P] long, 0 = background, 1 + index into COLORS
    kind: torch.Tensor  # [P] long, 0 = background, 1 + index into SHAPES
    box: torch.Tensor  # [P, 4] float, the shape's box / IMAGE_SIZE (0 on background)
    digits: torch.Tensor  # [P, 12] long: the 12 digits of the box as the answer writes it (-100 on background)


def patch_targets(shapes: tuple[Shape, ...], grid: int = IMAGE_SIZE // PATCH_SIZE) -> PatchTargets:
    color = torch.zeros(grid * grid, dtype=torch.long)
    kind = torch.zeros(grid * grid, dtype=torch.long)
    box = torch.zeros(grid * grid, 4)
    digits = torch.full((grid * grid, 12), -100, dtype=torch.long)
    for shape in shapes:
        inside = covered_patches(shape, grid)
        color[inside] = 1 + list(COLORS).index(shape.color)
        kind[inside] = 1 + SHAPES.index(shape.kind)
        box[inside] = torch.tensor(shape.box, dtype=torch.float) / IMAGE_SIZE
        digits[inside] = box_digits(shape)
    return PatchTargets(color, kind, box, digits)


class PatchHeads(torch.nn.Module):
    """Training-only linear heads on the image features the language model reads (the adapter's
    output, boi/eoi excluded): each patch's colour, shape, box and the box's twelve digits as the
    grounding answer writes them. Without them the trained patch projection and adapter wash the
    patches' positions out of the features (a linear probe recovered a patch's position with R^2
    about 0), and the language model, which sees every image token at one position id, cannot
    ground anything. Measured on CPU, 6800-step budget, 100 held-out samples per task:
    grounding 2% -> 34% with the colour, shape and box heads -> 42% with the digits too (a lone
    shape's box: 27 of 28), VQA 63% -> 77% -> 78%. The heads are dropped from the checkpoint."""

    def __init__(self, hidden: int, use_digits: bool = True):
        super().__init__()
        self.use_digits = use_digits
        self.color = torch.nn.Linear(hidden, 1 + len(COLORS))
        self.kind = torch.nn.Linear(hidden, 1 + len(SHAPES))
        self.box = torch.nn.Linear(hidden, 4)
        self.digits = torch.nn.Linear(hidden, 12 * 10)

    def loss(self, features: torch.Tensor, batch: list[Encoded]) -> torch.Tensor:  # features: [B, P, hidden]
        device = features.device
        flat = features.reshape(-1, features.shape[-1])  # [B * P, hidden]
        color = torch.cat([e.patches.color for e in batch]).to(device)
        kind = torch.cat([e.patches.kind for e in batch]).to(device)
        box = torch.cat([e.patches.box for e in batch]).to(device)
        foreground = color > 0
        box_loss = F.smooth_l1_loss(self.box(flat)[foreground], box[foreground], beta=0.05) * 10
        loss = F.cross_entropy(self.color(flat), color) + F.cross_entropy(self.kind(flat), kind) + box_loss
        if self.use_digits:
            digits = torch.cat([e.patches.digits for e in batch]).to(device)  # [B * P, 12]
            loss = loss + F.cross_entropy(self.digits(flat).view(-1, 10), digits.view(-1), ignore_index=-100)
        return loss


@dataclass
class SubjectTargets:
    """Where the question's named shapes are (at most two: "Is the red circle left of the blue square?")."""

    box: torch.Tensor  # [2, 4] float, box / IMAGE_SIZE (0 where the question names fewer shapes)
    digits: torch.Tensor  # [2, 12] long, the box's digits as the answer writes them (-100 where absent)

    @property
    def present(self) -> torch.Tensor:  # [2] bool
        return self.digits[:, 0] >= 0


def subject_targets(subjects: tuple[Shape, ...]) -> SubjectTargets:
    box, digits = torch.zeros(2, 4), torch.full((2, 12), -100, dtype=torch.long)
    for i, shape in enumerate(subjects):
        box[i] = torch.tensor(shape.box, dtype=torch.float) / IMAGE_SIZE
        digits[i] = box_digits(shape)
    return SubjectTargets(box, digits)


class SubjectHeads(torch.nn.Module):
    """Training-only linear heads on the language model's last hidden state at every position that
    predicts an answer token: the box (and the box's digits) of each shape the question names.
    The answer loss alone teaches selection weakly: under teacher forcing a grounding answer's
    later digits can be copied from the patch whose features match the digits already written
    (the patch heads put them there), so only the first digit needs the shape picked by name;
    teacher-forced accuracy of that digit on 2-3 shape scenes was 0.35-0.58. These heads ask for
    the whole named box at every answer position, which only attention to the named shape's
    patches can give. Measured on held-out samples (28 min; before on 100 per task, after on 500):
    grounding 42% -> 92% (with two or three shapes: 15 of 72 -> 315 of 353), VQA 78% -> 92%; the
    first digit's teacher-forced accuracy 0.73-0.84."""

    def __init__(self, hidden: int):
        super().__init__()
        self.box = torch.nn.Linear(hidden, 2 * 4)
        self.digits = torch.nn.Linear(hidden, 2 * 12 * 10)

    def loss(self, hidden: torch.Tensor, batch: list[Encoded], length: int) -> torch.Tensor:  # hidden: [B * L, H]
        device = hidden.device
        named = [(b, e) for b, e in enumerate(batch) if e.subjects.present.any()]
        if not named:
            return torch.zeros((), device=device)
        rows = [r for b, e in named for r in range(b * length + e.loss_from - 1, b * length + len(e.input_ids) - 1)]
        counts = torch.tensor([len(e.input_ids) - e.loss_from for _, e in named])  # answer rows per sequence
        h = hidden[torch.tensor(rows, device=device)]  # [R, H]
        box_t = torch.stack([e.subjects.box for _, e in named]).repeat_interleave(counts, 0).to(device)  # [R, 2, 4]
        digits_t = (
            torch.stack([e.subjects.digits for _, e in named]).repeat_interleave(counts, 0).to(device)
        )  # [R, 2, 12]
        present_t = digits_t[:, :, 0] >= 0  # [R, 2]
        box_loss = F.smooth_l1_loss(self.box(h).view(-1, 2, 4)[present_t], box_t[present_t], beta=0.05) * 10
        digit_loss = F.cross_entropy(self.digits(h).view(-1, 10), digits_t.view(-1), ignore_index=-100)
        return box_loss + digit_loss


class PaddedCausalAttention:
    """Training backend: the flat batch is B sequences padded to L; causal SDPA per sequence.
    Padding sits at each sequence's end, so causality keeps it out of every real row."""

    def __init__(self, batch: int, length: int):
        self.batch, self.length = batch, length

    def attend(self, layer_idx, q, k, v, cos_sin):  # q, k, v: [B * L, H, D]
        q, k = rotate_qk(q, k, cos_sin)
        b, length, heads, dim = self.batch, self.length, q.shape[1], q.shape[2]
        out = F.scaled_dot_product_attention(*(t.view(b, length, heads, dim).transpose(1, 2) for t in (q, k, v)),
                                             is_causal=True)  # fmt: skip
        return out.transpose(1, 2).reshape(b * length, heads * dim)


def batch_loss(
    model: CogVLMForCausalLM,
    batch: list[Encoded],
    pad_id: int,
    heads: PatchHeads | None = None,
    subject_heads: SubjectHeads | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cross-entropy on answer tokens, the patch heads' loss or 0, the subject heads' loss or 0)."""
    device = model.device
    length = max(len(e.input_ids) for e in batch)
    ids, positions, mask, targets, slots = [], [], [], [], []
    for row, e in enumerate(batch):
        pad = length - len(e.input_ids)
        ids += e.input_ids + [pad_id] * pad
        positions += e.positions + [0] * pad
        mask += vision_expert_mask(e.token_types) + [False] * pad
        # position t predicts token t + 1; only the answer (and eos) is learned
        labels = [-100] * length
        for t in range(e.loss_from - 1, len(e.input_ids) - 1):
            labels[t] = e.input_ids[t + 1]
        targets += labels
        slots += [row * length + i for i, tt in enumerate(e.token_types) if tt == 1]
    features = model.encode_images(torch.stack([e.pixels for e in batch]).to(device))  # [B, N_img, hidden]
    embeds = model.embed(torch.tensor(ids, device=device), features.reshape(-1, features.shape[-1]),
                         torch.tensor(slots, device=device))  # fmt: skip
    hidden = model(embeds, torch.tensor(positions, device=device), torch.tensor(mask, device=device),
                   PaddedCausalAttention(len(batch), length))  # fmt: skip
    logits = model.compute_logits(hidden)
    lm_loss = F.cross_entropy(logits, torch.tensor(targets, device=device), ignore_index=-100)
    zero = torch.zeros((), device=device)
    aux_loss = heads.loss(features[:, 1:-1], batch) if heads is not None else zero
    subject_loss = subject_heads.loss(hidden, batch, length) if subject_heads is not None else zero
    return lm_loss, aux_loss, subject_loss


def init_weights(model: CogVLMForCausalLM, seed: int) -> None:
    """std 0.02 everywhere, except where EVA's post-sublayer LayerNorm needs help: its residual
    branches are normalised to unit size, so at the usual init they drown each patch's own
    content in near-uniform attention averages (measured: features of two different images
    differed by 2% and the tower's gradients were 1e-6). Starting those LayerNorm weights at 0.1
    keeps the patch content dominant until the branches learn something."""
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if name.startswith("model.vision.transformer") and "layernorm.weight" in name:
            torch.nn.init.constant_(param, 0.1)
        elif name.endswith(("norm.weight", "layernorm.weight", "norm1.weight")):
            torch.nn.init.ones_(param)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(param)
        elif name == "model.vision.patch_embedding.proj.weight":
            torch.nn.init.kaiming_uniform_(param, a=5**0.5)  # nn.Conv2d's default: patches keep unit scale
        elif name == "model.vision.patch_embedding.position_embedding.weight":
            with torch.no_grad():
                param.copy_(sincos_2d(model.config.vision.grid_size, param.shape[1]))
        else:
            torch.nn.init.normal_(param, std=0.02)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:  # [1 + grid^2, dim]
    """Position embeddings that start out knowing where each patch is (half the channels encode x,
    half y): grounding needs positions, and learning them from noise costs thousands of steps."""
    quarter = dim // 4
    freqs = 1.0 / (100 ** (torch.arange(quarter) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(coord):
        angles = coord.flatten()[:, None].float() * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.zeros(1 + grid * grid, dim)
    table[1:, : 4 * quarter] = 0.5 * torch.cat([encode(xs), encode(ys)], dim=1)
    return table


def save_checkpoint(model: CogVLMForCausalLM, out: Path) -> None:
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))


def plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = 25
    smooth = [
        sum(losses[max(0, i - window) : i + 1]) / len(losses[max(0, i - window) : i + 1]) for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(losses, alpha=0.3, label="batch loss")
    ax.plot(smooth, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="cross-entropy on answer tokens", yscale="log", title="tiny CogVLM on shapes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def tail_mean(values: list[float], count: int = 50) -> float:
    return sum(values[-count:]) / max(1, len(values[-count:]))


def train(cfg: TrainConfig) -> Path:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_sentencepiece_tokenizer(out, corpus(), cfg.vocab_size, split_digits=True)
    model_cfg = model_config(vocab, cfg.hidden_size, cfg.num_layers, cfg.num_heads)
    processor = Processor(load_tokenizer(out), model_cfg)
    model = CogVLMForCausalLM(model_cfg)
    init_weights(model, cfg.seed)
    heads = PatchHeads(model_cfg.hidden_size, cfg.aux_digits) if cfg.aux_weight > 0 else None
    subject_heads = SubjectHeads(model_cfg.hidden_size) if cfg.subject_weight > 0 else None
    model.to(cfg.device).train()
    params = list(model.parameters())
    for extra in (heads, subject_heads):
        params += list(extra.to(cfg.device).parameters()) if extra is not None else []
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))
    rng = random.Random(cfg.seed)
    losses: list[float] = []
    aux_losses: list[float] = []
    subject_losses: list[float] = []
    start = time.monotonic()
    budget = cfg.minutes * 60
    bar = tqdm(range(cfg.steps), desc="training", mininterval=5)
    for step in bar:
        progress = max(step / cfg.steps, (time.monotonic() - start) / budget)
        if progress >= 1:
            break
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = []
        while len(batch) < cfg.batch_size:
            encoded = encode(processor, make_sample(rng, weights=cfg.task_weights))
            if encoded is not None:
                batch.append(encoded)
        loss, aux_loss, subject_loss = batch_loss(model, batch, model_cfg.pad_token_id, heads, subject_heads)
        optimizer.zero_grad(set_to_none=True)
        (loss + cfg.aux_weight * aux_loss + cfg.subject_weight * subject_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        aux_losses.append(aux_loss.item())
        subject_losses.append(subject_loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", aux=f"{aux_losses[-1]:.3f}", subject=f"{subject_losses[-1]:.3f}",
                        lr=f"{lr:.1e}", refresh=False)  # fmt: skip
    bar.close()
    save_checkpoint(model.eval(), out)
    plot_loss(losses, out / "loss_curve.png")
    log = {"config": cfg.__dict__, "steps": len(losses), "minutes": (time.monotonic() - start) / 60,
           "final_loss": tail_mean(losses), "final_aux_loss": tail_mean(aux_losses),
           "final_subject_loss": tail_mean(subject_losses)}  # fmt: skip
    if cfg.eval_per_task:
        from training.evaluate import evaluate_reference

        log["held_out_reference"] = evaluate_reference(str(out), cfg.eval_per_task)
    (out / "training_log.json").write_text(json.dumps(log, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = TrainConfig()
    parser.add_argument("--out", default=defaults.out)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--minutes", type=float, default=defaults.minutes)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--aux-weight", type=float, default=defaults.aux_weight)
    parser.add_argument("--no-aux-digits", dest="aux_digits", action="store_false")
    parser.add_argument("--subject-weight", type=float, default=defaults.subject_weight)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument(
        "--task-weights", type=float, nargs=3, default=defaults.task_weights, metavar=("CAPTION", "VQA", "GROUNDING")
    )
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers)
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads)
    parser.add_argument("--eval-per-task", type=int, default=defaults.eval_per_task)
    args = parser.parse_args()
    cfg = TrainConfig(out=args.out, steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, threads=args.threads, aux_weight=args.aux_weight, device=args.device,
                      subject_weight=args.subject_weight,
                      aux_digits=args.aux_digits,
                      eval_per_task=args.eval_per_task, task_weights=tuple(args.task_weights),
                      hidden_size=args.hidden_size, num_layers=args.num_layers,
                      num_heads=args.num_heads)  # fmt: skip
    print(f"checkpoint written to {train(cfg)}")


if __name__ == "__main__":
    main()
