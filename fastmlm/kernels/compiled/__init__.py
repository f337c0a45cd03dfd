"""Adapters over fastmlm._C (sources in csrc/): each allocates its outputs,
checks shapes, dtypes and devices cheaply, and calls one compiled entry point
on the CPU (C++/OpenMP) or the tensor's CUDA device and current stream.

Modules: `masking` (mask_tokens, masked_positions), `gather` (gather_rows,
scatter_add_rows), `cross_entropy`. Each answers `available(device_type)`.
"""
