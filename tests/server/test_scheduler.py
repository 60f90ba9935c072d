from hypothesis import given, settings
from hypothesis import strategies as st

from server.kv_blocks import KVCacheManager
from server.scheduler import Scheduler, SchedulerConfig
from tests.server.fake import FakeRunner, make_request


def make(num_blocks=64, budget=32, max_seqs=8, caching=True):
    kv = KVCacheManager(num_blocks, block_size=4, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(max_seqs, budget, max_model_len=512), kv), FakeRunner()


def assert_blocks_consistent(scheduler):
    pool = scheduler.kv.pool
    held = sum(len(b.block_ids) for b in scheduler.kv.requests.values())
    assert sum(b.ref_count for b in pool.blocks) == held  # every reference is someone's
    assert all(b.ref_count >= 0 for b in pool.blocks)
    assert {b.block_id for b in pool.blocks if b.ref_count == 0} == set(pool.free_blocks)
    assert all(pool.blocks[i].block_hash == h for h, i in pool.cached.items())


def step(scheduler, runner):
    out = scheduler.schedule()
    return out, scheduler.update(out, runner.execute(out))


def test_budget_is_respected_and_long_prompts_are_chunked():
    scheduler, runner = make(budget=10)
    scheduler.add(make_request("a", 25))
    scheduler.add(make_request("b", 3))
    out, _ = step(scheduler, runner)
    assert [(s.seq.request_id, s.start, s.end) for s in out.scheduled] == [("a", 0, 10)]
    out, _ = step(scheduler, runner)
    assert [(s.seq.request_id, s.start, s.end) for s in out.scheduled] == [("a", 10, 20)]
    out, events = step(scheduler, runner)  # a's last 5 prompt tokens + b's 3 (FCFS, within budget)
    assert [(s.seq.request_id, s.start, s.end) for s in out.scheduled] == [("a", 20, 25), ("b", 0, 3)]
    assert {e.request.request_id for e in events} == {"a", "b"}  # both reached their end and sampled


def test_decodes_are_never_starved_by_a_long_prefill():
    scheduler, runner = make(budget=8, num_blocks=256)
    for i in range(4):
        scheduler.add(make_request(f"d{i}", 3, max_tokens=50))
    step(scheduler, runner)  # all four prefills fit: 12 > 8, so d0, d1 then d2 partly
    while any(r.num_computed_tokens < r.seq.num_prompt_tokens for r in scheduler.running) or scheduler.waiting:
        step(scheduler, runner)
    scheduler.add(make_request("long", 100))
    for _ in range(10):
        out, _ = step(scheduler, runner)
        ids = [s.seq.request_id for s in out.scheduled]
        assert ids[:4] == ["d0", "d1", "d2", "d3"]  # every decode, every step, first
        assert all(s.num_new_tokens == 1 for s in out.scheduled[:4])
        assert out.num_tokens <= 8


def test_waiting_requests_are_served_first_come_first_served():
    scheduler, runner = make(budget=100, num_blocks=10)  # 40 tokens of KV
    scheduler.add(make_request("big", 30, max_tokens=2))
    scheduler.add(make_request("huge", 38, max_tokens=2))  # does not fit while big runs
    scheduler.add(make_request("small", 2, max_tokens=2))  # would fit, but must not overtake
    out, _ = step(scheduler, runner)
    assert [s.seq.request_id for s in out.scheduled] == ["big"]
    order = ["big"]
    while scheduler.has_unfinished:
        out, _ = step(scheduler, runner)
        order += [s.seq.request_id for s in out.scheduled if s.seq.request_id not in order]
    assert order == ["big", "huge", "small"]


def test_preemption_takes_the_newest_and_requeues_it_first():
    scheduler, runner = make(budget=64, num_blocks=6)  # 24 tokens
    scheduler.add(make_request("old", 10, max_tokens=20))
    scheduler.add(make_request("new", 10, max_tokens=20, first_token=20))
    out, _ = step(scheduler, runner)
    assert len(out.scheduled) == 2  # both fit at first: 6 blocks
    while scheduler.num_preemptions == 0:
        step(scheduler, runner)
    assert scheduler.waiting[0].request_id == "new" and scheduler.waiting[0].num_computed_tokens == 0
    assert [r.request_id for r in scheduler.running] == ["old"]


def test_prefix_cache_hit_skips_cached_blocks_and_keeps_one_token():
    scheduler, runner = make(budget=64)
    first = make_request("a", 13, max_tokens=1)
    scheduler.add(first)
    while scheduler.has_unfinished:
        step(scheduler, runner)
    again = make_request("b", 13, max_tokens=1)
    scheduler.add(again)
    out, _ = step(scheduler, runner)
    assert (out.scheduled[0].start, out.scheduled[0].end) == (12, 13)  # 3 blocks of 4 from the cache
    exact = make_request("c", 12, max_tokens=1)  # fully cached: the last block is recomputed
    scheduler.add(exact)
    out, _ = step(scheduler, runner)
    assert (out.scheduled[0].start, out.scheduled[0].end) == (8, 12)


def test_image_content_is_part_of_the_block_key():
    scheduler, runner = make(budget=64)
    scheduler.add(make_request("a", 20, max_tokens=1, image_at=1, image_len=10, image_hash="cat"))
    while scheduler.has_unfinished:
        step(scheduler, runner)
    scheduler.add(make_request("b", 20, max_tokens=1, image_at=1, image_len=10, image_hash="dog"))
    out, _ = step(scheduler, runner)
    assert out.scheduled[0].start == 0  # same token ids, other image: no reuse
    scheduler.add(make_request("c", 20, max_tokens=1, image_at=1, image_len=10, image_hash="cat"))
    out, _ = step(scheduler, runner)
    assert out.scheduled[0].start == 16


def add_or_abort(scheduler, op: str, size: int, pick: int, index: int) -> bool:
    """The random workloads' add and abort operations; False for a step (or an abort of nothing)."""
    if op == "add":
        scheduler.add(make_request(f"r{index}", size, max_tokens=1 + pick, first_token=pick % 3))
        return True
    if op == "abort" and scheduler.requests:
        ids = sorted(scheduler.requests)
        scheduler.finish(ids[pick % len(ids)], "abort")
        return True
    return False


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "abort", "step", "step"]), st.integers(1, 40), st.integers(0, 9)), max_size=60
    )
)
def test_random_workloads_never_leak_or_double_free_blocks(ops):
    scheduler, runner = make(num_blocks=16, budget=24, max_seqs=5)
    pool = scheduler.kv.pool
    for index, (op, size, pick) in enumerate(ops):
        if not add_or_abort(scheduler, op, size, pick, index):
            step(scheduler, runner)
        assert_blocks_consistent(scheduler)
    for request_id in list(scheduler.requests):
        scheduler.finish(request_id, "abort")
    assert pool.num_free == 16 and not scheduler.kv.requests


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "abort", "step", "step", "step"]), st.integers(1, 40), st.integers(0, 9)),
        max_size=80,
    )
)
def test_random_workloads_with_look_ahead_never_leak_or_double_free_blocks(ops):
    """The engine's look-ahead order: plan and launch step N + 1 (ahead), then read step N.
    Aborts land while a step is in flight, requests stop on a sampled stop id the step after
    their look-ahead token was planned, and a pool of 16 blocks forces preemptions (which
    fall back to reading first)."""
    scheduler, runner = make(num_blocks=16, budget=24, max_seqs=5)
    runner.stop_every = 7
    pool = scheduler.kv.pool
    in_flight = None
    for index, (op, size, pick) in enumerate(ops):
        if not add_or_abort(scheduler, op, size, pick, index):
            ahead = scheduler.schedule(ahead=True) if in_flight else None
            if ahead is not None and ahead.scheduled:
                assert ahead.num_tokens <= 24
                result = runner.execute(ahead)
                scheduler.launched(ahead)
                scheduler.update(*in_flight)
                in_flight = (ahead, result)
            else:
                if in_flight:
                    scheduler.update(*in_flight)
                out = scheduler.schedule()
                result = runner.execute(out)
                scheduler.launched(out)
                in_flight = (out, result)
        assert_blocks_consistent(scheduler)
        for request in scheduler.running:  # never more computed than known, plus the token in flight
            assert request.num_computed_tokens <= request.num_tokens + 1
    if in_flight:
        scheduler.update(*in_flight)
    for request_id in list(scheduler.requests):
        scheduler.finish(request_id, "abort")
    assert pool.num_free == 16 and not scheduler.kv.requests
