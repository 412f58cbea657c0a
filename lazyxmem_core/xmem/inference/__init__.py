"""XMem inference: memory stores, the memory manager and the per-frame engine."""
