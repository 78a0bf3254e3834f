"""Task-batched ops: one module per op, each with its pure-PyTorch per-task reference."""
