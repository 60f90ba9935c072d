"""The decode benchmark on CPU: its crowded case (the tiny architecture) fills the KV pool only
as far as it holds without preempting, its floor counts each sequence's keys and values, and
its profiler summaries add up what they say."""

import torch

from benchmarks.bench_decode import crowded_decode
from benchmarks.full_size import DigitTokenizer, random_model
from model.processor import Conversation, Processor
from model.sampling_params import SamplingParams
from server.engine import Engine, EngineConfig


def test_crowded_decode_takes_what_the_pool_holds_without_preempting():
    model = random_model("tiny", "cpu", torch.float32)
    processor = Processor(DigitTokenizer(), model.config)
    prompts = [processor.build(Conversation(query=f"{i:02d}" + "7" * 60)) for i in range(6)]  # ~75 tokens each
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine = Engine(
        model, processor, EngineConfig(num_kv_blocks=20, block_size=16, max_model_len=320)
    )  # 6 blocks a sequence: 3 fit
    held = []  # what before_abort saw: the sequences, the blocks free while they still hold theirs, their tokens
    sequences, ms, floor_ms = crowded_decode(
        engine,
        prompts,
        params,
        steps=4,
        weight_bytes=0,
        bandwidth=1e9,
        before_abort=lambda n: held.append(
            (n, engine.kv.num_free_blocks, [r.num_tokens for r in engine.scheduler.running])
        ),
    )
    assert sequences == 3 and ms > 0 and held[0][0] == 3 and held[0][1] <= 20 - 3 * 5
    assert engine.scheduler.num_preemptions == 0
    assert not engine.has_unfinished and engine.kv.num_free_blocks == 20  # aborted, every block back
    per_token = 2 * model.config.num_layers * model.config.num_kv_heads * model.config.head_dim * 4  # fp32 K and V
    tokens = held[0][2]  # each past its prompt by the prefill's token, 3 settling steps and 4 timed ones
    assert len(tokens) == 3 and all(t >= prompts[0].num_tokens + 1 + 3 + 4 for t in tokens)
    assert floor_ms == (sum(tokens) - 3 * 4 / 2) * per_token / 1e9 * 1e3  # the timed steps' mean context


def test_crowded_sequences_outlast_a_prefill_spread_over_many_steps():
    """At a small step budget the prompts prefill over many steps while the first admitted decode:
    params' own max_tokens (5) would end those before the timed steps; every sequence is still in
    the batch when they end."""
    model = random_model("tiny", "cpu", torch.float32)
    processor = Processor(DigitTokenizer(), model.config)
    prompts = [processor.build(Conversation(query=f"{i:02d}" + "7" * 60)) for i in range(3)]  # ~75 tokens each
    engine = Engine(model, processor, EngineConfig(num_kv_blocks=40, block_size=16, max_model_len=320,
                                                   max_num_batched_tokens=24))  # ~10 steps of prefill  # fmt: skip
    seen = []
    sequences, _, _ = crowded_decode(engine, prompts, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                                     steps=4, weight_bytes=0, bandwidth=1e9,
                                     before_abort=lambda n: seen.append(len(engine.scheduler.running)))  # fmt: skip
    assert sequences == 3 and seen == [3] and not engine.has_unfinished


def test_attention_share_sums_the_attention_kernels_of_a_step():
    """bench_decode's profiler summaries (GPU-only to collect): per step, over 5 replays."""
    from types import SimpleNamespace

    from benchmarks.bench_decode import attention_ms, kernel_times

    events = [SimpleNamespace(key=k, device_time_total=us, count=n) for k, us, n in [
        ("_gemv_kernel", 17000.0, 640), ("_decode_split_kernel", 1500.0, 160), ("_paged_attention_kernel", 500.0, 5),
        ("_rotary_kernel", 270.0, 160)]]  # fmt: skip
    assert attention_ms(events) == 0.4  # (1500 + 500) us / 5 steps
    table = kernel_times(events, rows=2).splitlines()
    assert len(table) == 2 and "3.400 ms" in table[0] and "128x" in table[0] and "_decode_split_kernel" in table[1]


def test_the_gemv_choices_name_each_key_and_its_config():
    """What bench_decode prints per mode: the autotuner picks among near-equal GEMV configs, and
    the same code read 3.78 and 3.73 ms a 17B step replayed in one run with different picks
    (twelfth session)."""
    import kernels.gemv as gemv_module
    from benchmarks.bench_decode import chosen_gemv_configs

    first, ahead = gemv_module.GPU_CONFIGS[0], next(c for c in gemv_module.GPU_CONFIGS if c.kwargs["AHEAD"])
    cache = {(12288, 4096, gemv_module.RMS_NORM, True, "torch.bfloat16"): ahead,
             (4096, 4096, gemv_module.PLAIN, False, "torch.bfloat16"): first}  # fmt: skip
    kw = ahead.kwargs
    assert chosen_gemv_configs(cache) == (
        f"12288x4096 rms_norm: {kw['BLOCK_N']}, {kw['BLOCK_K']}, {ahead.num_warps}, {kw['STAGES']}, 1; "
        f"4096x4096 plain: 8, 1024, 4, 3, 0"
    )
