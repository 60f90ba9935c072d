"""The grouped-rows experiment (kernels/grouped_expert_linear.py) against the float64 oracle: its
slots, mapped back to their rows, give expert_linear's results. On CPU it runs in the Triton
interpreter (fp32, fp16); with CUDA compiled and warp-specialised, bf16 included."""

import pytest
import torch

from kernels.expert_linear import expert_gated_up_ref, expert_linear_ref
from kernels.expert_routing import from_slots, route_by_expert, slot_vision_mask, to_slots
from kernels.grouped_expert_linear import grouped_expert_linear, grouped_gated_up
from tests.kernels.error_bound import DEVICE, DTYPES, check_close
from tests.kernels.test_expert_linear import pattern, weights


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [1, 130, 700])
@pytest.mark.parametrize("mask_name", ["all_text", "all_vision", "long_run", "two_runs", "random"])
def test_grouped_rows_match_reference(dtype, num_tokens, mask_name):
    x = torch.randn(num_tokens, 72, device=DEVICE).to(dtype)
    mask = pattern(mask_name, num_tokens)
    routing = route_by_expert(mask)
    w_lang, w_vis, _, b_vis = weights(200, 72, dtype, bias_on=("vision",))
    out = from_slots(grouped_expert_linear(to_slots(x, routing), routing, w_lang, w_vis, None, b_vis), routing)
    ref64 = expert_linear_ref(x.double(), mask, w_lang.double(), w_vis.double(), None, b_vis.double())
    check_close(out, ref64, expert_linear_ref(x, mask, w_lang, w_vis, None, b_vis))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_on", [("language",), ("language", "vision")], ids=str)
def test_grouped_bias_by_expert(dtype, bias_on):
    x = torch.randn(300, 96, device=DEVICE).to(dtype)
    mask = pattern("long_run", 300)
    routing = route_by_expert(mask)
    w_lang, w_vis, b_lang, b_vis = weights(130, 96, dtype, bias_on)
    out = from_slots(grouped_expert_linear(to_slots(x, routing), routing, w_lang, w_vis, b_lang, b_vis), routing)
    f64 = [t.double() if t is not None else None for t in (x, w_lang, w_vis, b_lang, b_vis)]
    check_close(
        out, expert_linear_ref(f64[0], mask, *f64[1:]), expert_linear_ref(x, mask, w_lang, w_vis, b_lang, b_vis)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_gated_up_matches_reference(dtype):
    x = torch.randn(300, 64, device=DEVICE).to(dtype)
    mask = pattern("two_runs", 300)
    routing = route_by_expert(mask)
    gates_ups = [(torch.randn(160, 64, device=DEVICE) / 8).to(dtype) for _ in range(4)]  # gate_l, up_l, gate_v, up_v
    out = from_slots(grouped_gated_up(to_slots(x, routing), routing, *gates_ups), routing)
    ref64 = expert_gated_up_ref(x.double(), mask, *(w.double() for w in gates_ups))
    check_close(out, ref64, expert_gated_up_ref(x, mask, *gates_ups))


def test_grouped_refuses_rows_out_of_slot_order():
    mask = pattern("long_run", 100)
    routing = route_by_expert(mask)
    x, w = torch.randn(100, 64, device=DEVICE), torch.randn(32, 64, device=DEVICE)
    with pytest.raises(ValueError, match="slots"):
        grouped_expert_linear(x, routing, w, w)  # the rows themselves, not their slots
    with pytest.raises(ValueError, match="contiguous"):
        grouped_expert_linear(to_slots(x, routing), routing, w.t().contiguous().t(), w)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the warp-specialised binary runs on CUDA only")
@pytest.mark.parametrize("gated", [False, True])
def test_the_warp_specialised_binary_gives_the_same_bits_every_run(gated):
    """Producer and consumer warpgroups hand buffers over through barriers; a buffer refilled while
    a consumer's wgmma still reads it (the race Meta's fork fixed in April 2026) would change
    results from run to run. A two-image batch at CogVLM's width, 20 runs, the same bits."""
    mask = torch.zeros(2 * 1267, dtype=torch.bool, device=DEVICE)
    mask[1:1227] = mask[1268:2494] = True
    routing = route_by_expert(mask)
    x = to_slots(torch.randn(mask.shape[0], 4096, device=DEVICE, dtype=torch.bfloat16), routing)
    ws = [(torch.randn(1024, 4096, device=DEVICE) / 64).to(torch.bfloat16) for _ in range(4 if gated else 2)]
    call = (lambda: grouped_gated_up(x, routing, *ws)) if gated else (lambda: grouped_expert_linear(x, routing, *ws))
    first = call()
    assert all(torch.equal(call(), first) for _ in range(20))
    xs = from_slots(x, routing)
    want = expert_gated_up_ref(xs.float(), mask, *(w.float() for w in ws)) if gated else (
        expert_linear_ref(xs.float(), mask, *(w.float() for w in ws)))  # fmt: skip
    assert ((from_slots(first, routing).float() - want).norm() / want.norm()).item() < 1e-2  # bf16 outputs


@pytest.mark.parametrize("mask_name", ["all_text", "all_vision", "two_runs", "random"])
def test_slot_order_round_trip(mask_name):
    """to_slots puts each row in its slot (padding slots copy row 0, so they stay finite) and
    from_slots reads it back: the model's way into slot order and out of it."""
    mask = pattern(mask_name, 300)
    routing = route_by_expert(mask, in_slots=True)
    x = torch.randn(300, 24, device=DEVICE)
    slots = to_slots(x, routing)
    assert slots.shape == (routing.num_slots, 24) and routing.in_slots
    sorted_rows = routing.sorted_rows.cpu()
    valid = sorted_rows >= 0
    assert torch.equal(slots.cpu()[valid], x.cpu()[sorted_rows[valid].long()])
    assert torch.equal(slots.cpu()[~valid], x.cpu()[0].expand(int((~valid).sum()), 24))
    assert torch.equal(from_slots(slots, routing), x)
    assert torch.equal(sorted_rows[routing.row_slots.cpu().long()], torch.arange(300, dtype=torch.int32))
    in_vision = slot_vision_mask(routing).cpu()
    assert torch.equal(in_vision[routing.row_slots.cpu().long()], mask.cpu())  # each row's slot is in its region
    assert not in_vision[: int(routing.vision_start)].any() and in_vision[int(routing.vision_start) :].all()


@pytest.mark.gpu
def test_no_host_synchronisation_in_slot_order():
    """Into slot order, the grouped projections and out again: no device value read on the host."""
    mask = pattern("two_runs", 2000)
    x = torch.randn(2000, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    routing = route_by_expert(mask, in_slots=True)
    grouped_expert_linear(to_slots(x, routing), routing, w, w)  # compile outside the check
    grouped_gated_up(to_slots(x, routing), routing, w, w, w, w)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        routing = route_by_expert(mask, in_slots=True)
        slots = to_slots(x, routing)
        from_slots(grouped_expert_linear(slots, routing, w, w), routing)
        from_slots(grouped_gated_up(slots, routing, w, w, w, w), routing)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_each_variant_tunes_over_its_own_configs():
    """The autotuner's pruning (on a GPU, every config is a candidate): a plain call takes the plain
    tiles, a gated one the gated tiles (half as wide, for their second accumulator), fp32 the small
    unpartitioned tile; each list holds warp-specialised tiles and one unpartitioned twin."""
    from kernels import grouped_expert_linear as grouped

    every = list(dict.fromkeys(grouped.PLAIN_CONFIGS + grouped.GATED_CONFIGS))  # the autotuner's list on a GPU
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    assert grouped._prune_configs(every, {"x_ptr": bf16}, GATED=False) == grouped.PLAIN_CONFIGS
    assert grouped._prune_configs(every, {"x_ptr": bf16}, GATED=True) == grouped.GATED_CONFIGS
    assert grouped._prune_configs(every, {"x_ptr": fp32}, GATED=True) == [grouped.SMALL_CONFIG]
    assert grouped._prune_configs([grouped.SMALL_CONFIG], {"x_ptr": bf16}, GATED=False) == [grouped.SMALL_CONFIG]
    for configs in (grouped.PLAIN_CONFIGS, grouped.GATED_CONFIGS):
        assert [c.kwargs["WS"] for c in configs] == [True] * (len(configs) - 1) + [False]
        assert all(c.num_warps == (4 if c.kwargs["WS"] else 8) for c in configs)  # WS partitions only at 4
    assert all(c.kwargs["BLOCK_N"] <= 128 for c in grouped.GATED_CONFIGS)
