"""Hot-path kernels. Each file: a Triton kernel, its launcher, and a plain-torch `*_ref` oracle.

This package imports only torch and triton.
"""
