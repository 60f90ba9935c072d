"""What every kernel test here shares: where the kernels run, in which dtypes, and the error bound.

On CPU the kernels run in the Triton interpreter, where bf16 arithmetic is wrong, so bf16 is
tested on CUDA only. The bound is flash-attention's rule: the kernel's error against a float64
oracle is at most 2x the error of plain torch in the same dtype.
"""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def check_close(out, ref64, baseline, slack=1e-6):
    """out: the kernel's result; ref64: the float64 oracle; baseline: plain torch in out's dtype.
    slack, relative to the oracle's largest value, covers results torch gets exactly."""
    assert out.dtype == baseline.dtype and out.shape == ref64.shape
    assert torch.isfinite(out).all()
    err = (out.double() - ref64).abs().max().item()
    torch_err = (baseline.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    assert err <= 2 * torch_err + slack * scale, (err, torch_err)
