"""The expert projection benchmark's timing: every contender timed in turns, the median of its
rounds reported (a fake timer on CPU; the benchmark itself needs a GPU)."""

import triton

from benchmarks.kernels.bench_expert_linear import bench_interleaved


def test_contenders_are_timed_in_turns_and_their_median_round_reported(monkeypatch):
    order = []  # the fn each timed round ran
    drift = iter(range(100))  # every later round reads slower, as a GPU whose clocks drop

    def fake_do_bench(fn, warmup=25, rep=100, return_mode="mean"):
        if rep == 1:
            return 0.0  # the warm-up pass
        order.append(fn())
        return {"ours": 10.0, "dense": 9.0}[order[-1]] + next(drift) * 0.1

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    times = bench_interleaved({"ours": lambda: "ours", "dense": lambda: "dense"}, rounds=3)
    assert order == ["ours", "dense"] * 3
    # rounds: ours 10.0, 10.2, 10.4 and dense 9.1, 9.3, 9.5: the middle ones, drift shared alike
    assert times == {"ours": 10.2, "dense": 9.3}
