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


def test_a_case_splits_its_graphed_ratio_into_routing_and_kernel(monkeypatch):
    """The graphed ratio against cuBLAS = routing (ours / the same rows all on one expert, through
    ours) x kernel (that / cuBLAS's dense GEMM); the one-expert call routes every row to one expert."""
    import torch

    import benchmarks.kernels.bench_expert_linear as bench
    from kernels.expert_routing import route_by_expert

    torch.set_num_threads(1)
    routed = []  # the masks the case routes, in order
    monkeypatch.setattr(bench, "route_by_expert", lambda mask: routed.append(mask.clone()) or route_by_expert(mask))

    def timed(value):  # a timer that runs the call (the interpreter) and reads `value`
        return lambda fn: (fn(), value)[1]

    graphed = iter([3.0, 2.0, 2.5, 1.8])  # ours, the dense GEMM, one expert, grouped rows: the case's order
    monkeypatch.setattr(bench, "graph_ms", lambda fn: timed(next(graphed))(fn))
    monkeypatch.setattr(bench, "bench_interleaved", lambda fns: {name: timed(1.0)(fn) for name, fn in fns.items()})
    monkeypatch.setattr(bench, "host_us", timed(0.0))
    mask = torch.zeros(40, dtype=torch.bool)
    mask[3:30] = True
    r = bench.run_case("tiny", "dense", mask, 64, 48, gated=False)
    assert r["routing_cost"] == 3.0 / 2.5 and r["kernel_vs_cublas"] == 2.5 / 2.0
    assert r["one_expert_graph_ms"] == 2.5 and r["graph_ratio_vs_dense"] == 3.0 / 2.0
    assert r["grouped_graph_ratio_vs_dense"] == 1.8 / 2.0
    assert r["grouped_config"] == "64, 64, 32, 4, 3"  # the interpreter's tile, not warp-specialised
    assert r["grouped_repeatable"] is True
    assert torch.equal(routed[0], mask) and routed[1].all() and len(routed) == 2 and len(routed[1]) == 40


def test_tile_counts_name_the_extra_and_the_gathered_tiles():
    """Two requests of 299 image rows and 41 text rows, 128-row tiles: the text rows fill one tile
    from two places (gathered), the vision rows five, one of them across the image boundary
    (gathered); the dense GEMM covers the 680 rows in six."""
    from benchmarks.kernels.bench_expert_linear import serving_mask, tile_counts
    from kernels.expert_routing import route_by_expert

    routing = route_by_expert(serving_mask(2, 300, "cpu"))
    assert tile_counts(routing, 128, 64, 200) == {"ours": 6 * 4, "dense": 6 * 4, "gathered": 2 * 4}
    one_image = route_by_expert(serving_mask(1, 1227, "cpu"))  # 17B, one image: 176 tiles to 160 at 128 x 256
    assert tile_counts(one_image, 128, 256, 4096) == {"ours": 176, "dense": 160, "gathered": 16}


def test_a_case_leaves_the_grouped_rows_out_when_gpu_check_says_so(monkeypatch):
    """gpu_check.sh sets COGSERVE_BENCH_GROUPED=0 when the experiment's GPU tests fail or hang: the
    case then never calls its kernel, and reports NaN for it."""
    import math

    import torch

    import benchmarks.kernels.bench_expert_linear as bench

    torch.set_num_threads(1)
    monkeypatch.setattr(bench, "GROUPED", False)

    def refuse(*args, **kwargs):
        raise AssertionError("the grouped-rows kernel ran")

    monkeypatch.setattr(bench, "grouped_expert_linear", refuse)
    graphed = iter([3.0, 2.0, 2.5])  # ours, the dense GEMM, one expert
    monkeypatch.setattr(bench, "graph_ms", lambda fn: (fn(), next(graphed))[1])
    monkeypatch.setattr(bench, "bench_interleaved", lambda fns: {name: (fn(), 1.0)[1] for name, fn in fns.items()})
    monkeypatch.setattr(bench, "host_us", lambda fn: 0.0)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[3:30] = True
    r = bench.run_case("tiny", "dense", mask, 64, 48, gated=False)
    assert math.isnan(r["grouped_graph_ratio_vs_dense"]) and math.isnan(r["grouped_ms"])
    assert r["routing_cost"] == 3.0 / 2.5


def test_a_case_reports_a_grouped_kernel_whose_results_change_from_run_to_run(monkeypatch):
    """What a warp-specialised binary with a buffer race would do: each run's bits differ."""
    import torch

    import benchmarks.kernels.bench_expert_linear as bench

    torch.set_num_threads(1)
    monkeypatch.setattr(bench, "grouped_expert_linear", lambda x, routing, w, *_: torch.randn(x.shape[0], w.shape[0]))
    monkeypatch.setattr(bench, "graph_ms", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "bench_interleaved", lambda fns: {name: (fn(), 1.0)[1] for name, fn in fns.items()})
    monkeypatch.setattr(bench, "host_us", lambda fn: 0.0)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[3:30] = True
    assert bench.run_case("tiny", "dense", mask, 64, 48, gated=False)["grouped_repeatable"] is False
