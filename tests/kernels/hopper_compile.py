"""Compile every Triton kernel the GPU path launches, for Hopper (sm_90), on a machine without a GPU.

Why: this project gets a GPU rarely and for 15 minutes at a time, and a kernel that fails to compile
there (a TMA descriptor, PDL's inline PTX, a config over the shared memory limit) costs a device
call. Triton compiles to a cubin without a device (ptxas ships in its wheel); only loading and
launching need one. `HopperStandIn` takes the place of Triton's CUDA driver: it reports sm_90 as the
current target, refuses what the real loader refuses (shared memory over 227 KB), reads registers
and spills from the cubin with cuobjdump, the Hopper instructions (wgmma, TMA, PDL) from the PTX
and whether loops were software-pipelined from the TTGIR, and launches nothing.

The calls (tests/kernels/hopper_calls.py) go through the real host wrappers with CPU tensors of
CogVLM-17B and CogVLM2 shapes, so the arguments, constexprs and config pruning are production's.
Two things are forced the way an H100 decides them: PDL (the wrappers launch it only on CUDA) and
the autotuned kernels' candidate lists (the GPU lists; the tests' single config elsewhere).

    python -m tests.kernels.hopper_compile          # every config of every call, bf16, fp16 and fp32
    python -m tests.kernels.hopper_compile --quick  # one config per TMA level and variant, bf16

Run it in a process of its own: TRITON_INTERPRET must be unset when the kernel modules import.
The same check runs against the GPU machine's Triton with `make compile-check-triton36`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

# The H100's limits the CUDA loader checks (cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KB).
H100_PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}
MAX_THREADS = 1024


@dataclasses.dataclass
class Compiled:
    call: str  # which production call asked for it
    kernel: str
    config: str  # the constexprs and launch options that select this binary
    shared: int = 0  # bytes
    registers: int = 0  # a thread
    spill_bytes: int = 0  # stack frame a thread: spilled registers, slow; nonzero means the config is too big
    # FEATURES found in the PTX, "pipelined" (TTGIR), "arrival after barrier" and
    # "write before PDL wait" and "trigger before PDL wait" (PTX order)
    features: list[str] = dataclasses.field(default_factory=list)
    error: str = ""


# The Hopper instructions a kernel's speed rests on, found in its PTX: a config that asks for TMA
# or PDL but lowers without it compiles and passes every test, only slower.
FEATURES = {
    "wgmma": "wgmma.mma_async",  # warpgroup tensor-core MMA (sm_90); else mma.sync at a fraction of the rate
    "tma": "cp.async.bulk.tensor",  # bulk tensor copies through TMA descriptors
    "pdl": "griddepcontrol.wait",  # programmatic dependent launch
    # "the last program to arrive merges" (stream-K tail, split decode): one thread's counter add
    "arrival count": "atom.global.gpu.acq_rel.add",
    "l2 prefetch": "prefetch.global.L2",  # the GEMV's weight rows asked of L2 (kernels/gemv.py, prefetch)
    # warpgroups given different register budgets: Triton's warp specialisation partitioned a loop
    "warp specialised": "setmaxnreg",
}
# "pipelined": Triton's software pipeliner gave a loop's loads a ring of buffers in shared memory
# (a 2-D tile allocated as [stages, rows, cols]), so several tiles are in flight while one is used.
MULTI_BUFFER = re.compile(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<\d+x\d+x\d+x")


class HopperStandIn:
    """Triton's driver interface, as far as compiling needs it."""

    def __init__(self):
        self.utils = self
        self.records: dict[tuple[str, str], Compiled] = {}
        self.call = ""
        self.requested: Compiled | None = None  # the compile in progress (set by the JIT's cache hook)

    # --- what the JIT and the autotuner ask the driver
    def is_active(self):
        return True

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_device_properties(self, device):
        return H100_PROPERTIES

    def get_benchmarker(self):
        """The autotuner 'times' each candidate: compile it, note a failure under its name, and let
        the autotuner treat it as it would on a GPU (a refused config is skipped)."""

        def bench(kernel_call, quantiles=None, **_):
            try:
                kernel_call()
            except Exception as e:
                self.fail(e)
                raise
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench

    # --- compile, load, launch
    def cache_hook(self, fn, compile, **_):
        """knobs.runtime.jit_cache_hook: called before each compile; returning False lets it go on."""
        names = fn.jit_function.arg_names
        constexprs = {names[path[0]]: value for path, value in compile["constants"].items() if len(path) == 1}
        # strides specialised to 1 are constexprs too; they select nothing a reader would tune
        shown = " ".join(f"{k}={v}" for k, v in constexprs.items() if not k.startswith("stride"))
        element = next(ty for ty in compile["signature"].values() if str(ty).startswith("*"))  # the first pointer's
        config = f"{element[1:]} {shown} warps={compile['num_warps']} stages={compile['num_stages']}"
        self.requested = self.records.setdefault((fn.name, config), Compiled(self.call, fn.name, config))
        return False

    def post_compile_hook(self, key, fn, **_):
        """knobs.runtime.jit_post_compile_hook: what the binary uses, read before the loader checks it.
        The hook is not handed the binary; the JIT has just put it in its cache under `key`."""
        if self.requested is None:
            return
        kernel_cache = fn.jit_function.device_caches[self.get_current_device()][0]
        kernel = kernel_cache[key]
        self.requested.shared = kernel.metadata.shared
        self.requested.registers, self.requested.spill_bytes = _resource_usage(kernel.asm["cubin"])
        ptx = kernel.asm["ptx"]
        features = [name for name, instruction in FEATURES.items() if instruction in ptx]
        if MULTI_BUFFER.search(kernel.asm["ttgir"]):
            features.append("pipelined")
        if _arrivals_follow_a_barrier(ptx):
            features.append("arrival after barrier")
        if _writes_before_the_pdl_wait(ptx):
            features.append("write before PDL wait")
        if _triggers_before_the_pdl_wait(ptx):
            features.append("trigger before PDL wait")
        if _loads_a_tile_before_the_pdl_wait(ptx):
            features.append("tile load before PDL wait")
        if 0 <= ptx.find("prefetch.global.L2") < ptx.find("griddepcontrol.wait"):
            features.append("l2 prefetch before PDL wait")  # what overlaps the kernel before
        self.requested.features = features

    def launcher_cls(self, src, metadata):
        return lambda *args: None  # launches nothing

    def load_binary(self, name, cubin, shared, device):
        self.requested = None  # loaded: a later failure is not this binary's
        return None, None, 0, 0, MAX_THREADS

    def fail(self, error: Exception) -> None:
        if self.requested is not None and not self.requested.error:
            self.requested.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:200]}"


# Global writes: plain and async stores, atomics and reductions, and the copy of a device-built
# TMA descriptor out to its global scratch buffer.
GLOBAL_WRITE = re.compile(r"\b(st\.global|st\.async|atom\.|red\.|cp\.async\.bulk\.global|tensormap\.cp_fenceproxy)")


def _writes_before_the_pdl_wait(ptx: str) -> bool:
    """Whether a global write comes before the first griddepcontrol.wait (kernels/pdl.py). Under PDL
    the kernel before may still be running there, reading buffers the caching allocator has already
    handed this launch: a write before the wait races with it. The GEMV's device-built TMA
    descriptor did so (an illegal instruction on an H200); our kernels wait first, or load
    weights only."""
    wait = ptx.find("griddepcontrol.wait")
    return wait >= 0 and GLOBAL_WRITE.search(ptx, 0, wait) is not None


# Vector loads from global memory: a thread's share of a tile (the lookups before a wait are scalars).
VECTOR_LOAD = re.compile(r"\bld\.global(\.[a-z0-9:]+)*\.v[248]\.")


def _loads_a_tile_before_the_pdl_wait(ptx: str) -> bool:
    """Whether vector loads of a tile come before the first griddepcontrol.wait: what overlaps the
    kernel before under PDL (the GEMV's first weight tile, the split decode's first K/V tile).
    A compiler that sank them past the wait would leave the kernel correct and slower."""
    wait = ptx.find("griddepcontrol.wait")
    return wait >= 0 and VECTOR_LOAD.search(ptx, 0, wait) is not None


def _triggers_before_the_pdl_wait(ptx: str) -> bool:
    """Whether griddepcontrol.launch_dependents comes before the first griddepcontrol.wait. Every
    kernel here triggers its dependents only after its own wait, so when a kernel starts, all but
    the kernel right before it have finished: the split decode reads the step's sequence lengths
    and block table before its wait on that account (kernels/pdl.py)."""
    wait, trigger = ptx.find("griddepcontrol.wait"), ptx.find("griddepcontrol.launch_dependents")
    return trigger >= 0 and (wait < 0 or trigger < wait)


def _arrivals_follow_a_barrier(ptx: str) -> bool:
    """Whether every arrival count is preceded by a block-wide barrier with no global store in between.
    One thread adds to the count; its release covers the other threads' stores of their parts only
    if they were ordered before it by the barrier. The kernels ask for it (`tl.debug_barrier()`,
    kernels/arrivals.py); a compiler that dropped or moved it would make the merge read parts
    still in flight."""
    seen = False
    for match in re.finditer(r"atom\.global\.gpu\.acq_rel\.add", ptx):
        before = ptx[: match.start()]
        if before.rfind("bar.sync") < before.rfind("st.global"):
            return False
        seen = True
    return seen


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack-frame bytes) a thread, from cuobjdump (ships with Triton, like ptxas).
    Triton kernels keep no local arrays, so a stack frame is spilled registers."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(word.split(":", 1) for line in text.splitlines() if "REG:" in line for word in line.split())
    return int(fields["REG"]), int(fields["STACK"])


def install() -> HopperStandIn:
    """Make sm_90 the target of every Triton launch in this process, and PDL launchable."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("hopper_compile needs a process without TRITON_INTERPRET=1 (the interpreter runs kernels)")
    stand_in = HopperStandIn()
    driver.set_active(stand_in)
    triton.knobs.runtime.jit_cache_hook = stand_in.cache_hook
    triton.knobs.runtime.jit_post_compile_hook = stand_in.post_compile_hook

    import kernels.gemv
    import kernels.paged_attention
    import kernels.rotary

    def pdl_launch(pdl, device):  # kernels/pdl.py's decision on an sm_90 device
        return pdl, ({"launch_pdl": True} if pdl else {})

    for module in (kernels.gemv, kernels.paged_attention, kernels.rotary):
        module.pdl_launch = pdl_launch
    return stand_in


def compile_all(quick: bool) -> list[Compiled]:
    stand_in = install()
    from kernels import expert_linear, gemv
    from kernels import grouped_expert_linear as grouped
    from tests.kernels.hopper_calls import production_calls, small_shape_calls

    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32):
        calls = production_calls(quick, dtype) + ([] if quick or dtype == torch.float16 else small_shape_calls(dtype))
        for label, call in calls:
            stand_in.call = f"{label} {str(dtype).removeprefix('torch.')}"
            for autotuned in (expert_linear._expert_linear_kernel, gemv._gemv_kernel, grouped._grouped_expert_kernel):
                autotuned.cache.clear()  # an earlier call's choice (its key lacks PDL) would skip the candidates
            try:
                call()
            except Exception as e:  # a refused autotune candidate is noted by the benchmarker, not raised
                stand_in.fail(e)
                if stand_in.requested is None:  # failed before any compile: the call itself is broken
                    stand_in.records[(label, "")] = Compiled(stand_in.call, "(host)", "", error=repr(e)[:300])
            stand_in.requested = None
    return list(stand_in.records.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one config per TMA level and variant, bf16 only")
    parser.add_argument("--json", help="also write the records here (the test reads them)")
    args = parser.parse_args()
    start = time.perf_counter()
    records = compile_all(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in records], f, indent=1)
    print("| kernel | config | shared KB | registers | spill bytes | Hopper instructions | first call | result |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        shared, features = f"{r.shared / 1024:.0f}", ", ".join(r.features)
        row = (r.kernel, r.config, shared, r.registers, r.spill_bytes, features, r.call, r.error or "ok")
        print("| " + " | ".join(map(str, row)) + " |")
    failed = [r for r in records if r.error]
    spilled = [r for r in records if r.spill_bytes and not r.error]
    print(
        f"\ntriton {triton.__version__}, sm_90: {len(records)} binaries, {len(failed)} refused, "
        f"{len(spilled)} spilling registers, {time.perf_counter() - start:.0f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
