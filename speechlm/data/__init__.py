"""Data preparation (shards -> Megatron indexed datasets, blend planning).

Modules here import without megatron.bridge and without the CPU-mode patches: the only Megatron
import is `megatron.core.datasets.indexed_dataset`, which works on CPU.
"""
