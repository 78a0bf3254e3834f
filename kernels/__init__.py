"""Triton kernels of maml_fast and their launchers, installed as `maml_fast.kernels` (setup.py maps the
repository's kernels/ there).

Importing this package imports nothing heavy: Triton is imported by the kernel modules themselves
(`maml_fast.kernels.conv2d`, `maml_fast.kernels.linear`), which the "triton" backend loads on its first use.
"""
