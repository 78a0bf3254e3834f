"""Triton kernels of maml_fast and their launchers.

Importing this package imports nothing heavy: Triton is imported by the kernel modules themselves
(`kernels.conv2d`), which maml_fast loads only when a Triton backend is first used.
"""
