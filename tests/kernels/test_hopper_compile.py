"""Every kernel the GPU path launches compiles for sm_90 (tests/kernels/hopper_compile.py), checked
on this machine without a GPU, so a kernel that no longer compiles for Hopper fails here and not in
a 15-minute device session."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# Where a GPU is, the GPU tests compile every kernel for real; this check is for machines without one
# (and would spend a lent GPU's minutes compiling on its CPU).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real")


TRITON36 = ROOT / ".triton36"  # the lent GPUs' Triton, which `make test` installs beside the venv's


def _start(args: list[str], triton_path: Path | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (triton_path, ROOT) if p)
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()  # a no-op once it has exited; else a hung compile does not outlive the test
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _run(args: list[str], triton_path: Path | None = None) -> subprocess.CompletedProcess:
    return _finish(_start(args, triton_path))


@pytest.fixture(scope="module")
def quick_checks(tmp_path_factory):
    """Both quick checks started at once, with the venv's Triton and with 3.6: each is a single-threaded
    compile of about 37 s on this 2-core machine, so together they take one's time, not two's."""
    checks = {}
    for name, triton_path in (("venv", None), ("3.6", TRITON36)):
        if name == "3.6" and not (TRITON36 / "triton").is_dir():
            continue
        out = tmp_path_factory.mktemp("hopper") / "records.json"
        args = ["-m", "tests.kernels.hopper_compile", "--quick", "--json", str(out)]
        checks[name] = (_start(args, triton_path), out)
    yield checks
    for process, _ in checks.values():
        process.kill()


@pytest.fixture(scope="module", params=["venv", "3.6"])
def records(request, quick_checks):
    """The quick check's records, with the venv's Triton and with 3.6: kernels must compile with both."""
    if request.param not in quick_checks:
        pytest.skip("Triton 3.6 is not installed beside the venv (`make test` installs it in .triton36)")
    process, out = quick_checks[request.param]
    done = _finish(process)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if request.param == "3.6":
        assert "triton 3.6." in done.stdout  # the 3.6 check ran 3.6, not the venv's
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90(records):
    assert not [r for r in records if r["error"]]
    names = {r["kernel"] for r in records}
    assert names == {
        "_expert_linear_kernel", "_gemv_kernel", "_paged_attention_kernel", "_decode_split_kernel",
        "_rotary_kernel", "_rms_norm_kernel", "_silu_and_mul_kernel", "_grouped_expert_kernel",
    }  # fmt: skip
    for r in records:
        assert r["shared"] <= 232448 and 0 < r["registers"] <= 255, r


def test_the_hopper_paths_are_the_ones_compiled(records):
    """TMA levels, stream-K, the gated MLP and PDL each reached the compiler (a wrapper that quietly
    took its pointer or non-PDL path on the stand-in would leave them unchecked)."""
    expert = [r["config"] for r in records if r["kernel"] == "_expert_linear_kernel"]
    for needle in ("TMA=0 SK=0", "TMA=1 SK=0", "TMA=2 SK=0", "TMA=2 SK=1", "GATED=True", "HAS_BIAS_VIS=True"):
        assert any(needle in c for c in expert), needle
    grouped = [set(r["config"].split()) for r in records if r["kernel"] == "_grouped_expert_kernel"]
    for gated in (False, True):  # each variant's warp-specialised loop and its unpartitioned twin
        for ws in (False, True):
            assert any({f"GATED={gated}", f"WS={ws}"} <= words for words in grouped), (gated, ws)
    for kernel in ("_gemv_kernel", "_rotary_kernel", "_paged_attention_kernel", "_decode_split_kernel"):
        assert any("PDL=True" in r["config"] for r in records if r["kernel"] == kernel), kernel
    gemv = [r["config"] for r in records if r["kernel"] == "_gemv_kernel"]
    assert {f"PROLOGUE={p}" for p in range(3)} <= {w for c in gemv for w in c.split()}
    assert any("PREFETCH=True" in c and "PDL=True" in c for c in gemv)


def test_each_binary_uses_the_hopper_instructions_its_config_asks_for(records):
    """A config that asks for TMA or PDL and lowers without it still passes every other test, only
    slower; so does an expert GEMM that falls back from wgmma to mma.sync, and a streaming loop that
    Triton did not pipeline (the GEMV's, until its K loop asked for its stages itself)."""
    for r in records:
        words = set(r["config"].split())
        wants_tma = bool(words & {"TMA=1", "TMA=2"}) or r["kernel"] == "_grouped_expert_kernel"  # TMA only
        assert ("tma" in r["features"]) == wants_tma, r
        assert ("pdl" in r["features"]) == ("PDL=True" in words), r
        assert "write before PDL wait" not in r["features"], r  # a race with the kernel before
        assert "trigger before PDL wait" not in r["features"], r  # the next kernel's early reads rest on it
        if "PDL=True" in words and (r["kernel"] == "_gemv_kernel" or "ROTARY=True" in words):
            # the GEMV's first weight tile, the split decode's first tile of cached K/V
            assert "tile load before PDL wait" in r["features"], r
        assert ("l2 prefetch" in r["features"]) == ("PREFETCH=True" in words), r
        if "PREFETCH=True" in words and "PDL=True" in words:
            assert "l2 prefetch before PDL wait" in r["features"], r  # the point: during the kernel before
        if r["kernel"] in ("_expert_linear_kernel", "_grouped_expert_kernel"):
            assert "wgmma" in r["features"], r
        # Triton partitions the grouped-rows loop (every tile one TMA run) where its config asks,
        # and nothing else here: not expert_linear's K loop, which sits under its run-or-gather
        # branch (the NOTE there)
        assert ("warp specialised" in r["features"]) == ("WS=True" in words), r
        streams = ("_expert_linear_kernel", "_grouped_expert_kernel", "_gemv_kernel", "_paged_attention_kernel")
        if r["kernel"] in streams:
            # weight or K/V tiles stream through a ring of buffers, except in the GEMV's STAGES=1 configs
            assert ("pipelined" in r["features"]) == ("STAGES=1" not in words), r
        # the programs that merge other programs' parts: the split decode, the stream-K tail
        merges = r["kernel"] == "_decode_split_kernel" or "SK=1" in words
        assert ("arrival count" in r["features"]) == merges, r
        assert ("arrival after barrier" in r["features"]) == merges, r  # else the merge may read parts in flight


def test_the_stand_in_refuses_what_an_h100_refuses(tmp_path):
    """A tile over the H100's 227 KB of shared memory is refused as the CUDA loader would refuse it,
    a thread holding more values than it has registers shows its spills, and a PDL kernel that
    writes before its wait is marked."""
    script = tmp_path / "oversized.py"
    script.write_text(
        textwrap.dedent("""
        import torch, triton, triton.language as tl
        from tests.kernels.hopper_compile import install

        @triton.jit
        def running_product(x_ptr, out_ptr, steps, N: tl.constexpr):
            i = tl.arange(0, N)
            acc = tl.zeros([N], dtype=tl.float32)
            for s in range(steps):
                acc = (acc + tl.load(x_ptr + s * N + i)) * tl.load(x_ptr + i + 1)
            tl.store(out_ptr + i, acc)

        @triton.jit
        def scaled_copy(x_ptr, out_ptr, scale_ptr, EARLY: tl.constexpr):
            i = tl.arange(0, 128)
            x = tl.load(x_ptr + i)  # a weight: no kernel writes it
            if EARLY:
                tl.store(out_ptr + i, x)
            tl.extra.cuda.gdc_wait()
            tl.store(out_ptr + i, x * tl.load(scale_ptr), mask=i > 0)

        stand_in = install()
        from kernels import expert_linear
        x, mask, w = torch.empty(300, 256), torch.arange(300) % 3 == 0, torch.empty(512, 256)
        too_big = expert_linear._config(256, 256, 64, 8, 4, tma=2)
        for label, config in (("fits", expert_linear.SAFE_CONFIG), ("too-big", too_big)):
            expert_linear._expert_linear_kernel.configs = [config]  # one config: the autotuner's pruning is skipped
            stand_in.call = label
            try:
                expert_linear.expert_linear(x.half(), mask, w.half(), w.half())
            except Exception as e:
                stand_in.fail(e)
        x = torch.empty(1 << 15)
        for label, n in (("1024-a-warp", 1024), ("8192-a-warp", 8192)):  # 32 and 256 fp32 values a thread
            stand_in.call = label
            running_product[(1,)](x, x, 4, N=n, num_warps=1)
        for label, early in (("waits-first", False), ("writes-early", True)):
            stand_in.call = label
            scaled_copy[(1,)](x, x, x, EARLY=early, launch_pdl=True)
        for r in stand_in.records.values():
            print(r.call, r.shared, r.spill_bytes, r.error.split(":")[0] or "ok", "write before PDL wait" in r.features)
    """)
    )
    done = _run([str(script)])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}
    assert rows["fits"][2] == "ok" and rows["too-big"][2] == "OutOfResources"
    assert int(rows["too-big"][0]) > 232448 >= int(rows["fits"][0])  # 4 stages x (256 + 256) x 64 x 2 bytes
    assert rows["1024-a-warp"][1:3] == ["0", "ok"]
    assert int(rows["8192-a-warp"][1]) > 0 and rows["8192-a-warp"][2] == "ok"
    assert rows["waits-first"][2:] == ["ok", "False"] and rows["writes-early"][2:] == ["ok", "True"]


def test_the_arrival_check_reads_the_order_of_barrier_store_and_atomic():
    from tests.kernels.hopper_compile import _arrivals_follow_a_barrier

    add = "@%p1 atom.global.gpu.acq_rel.add.u32 %r1, [ %rd1 + 0 ], %r2;"
    assert _arrivals_follow_a_barrier(f"st.global.b32 [%rd2], %r3;\nbar.sync 0;\n{add}")
    assert not _arrivals_follow_a_barrier(f"bar.sync 0;\nst.global.b32 [%rd2], %r3;\n{add}")  # a store after it
    assert not _arrivals_follow_a_barrier("bar.sync 0;\nst.global.b32 [%rd2], %r3;")  # no arrival at all
