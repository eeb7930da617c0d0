"""The training stage: recipe -> Bridge ConfigContainer -> pretrain() (`python -m speechlm.train`).

Nothing is imported here: the checkpoint policy (checkpoints.py) stays importable without Megatron,
and the CPU mode (cpu_compat) must be applied before the first Megatron import (megatron_env).
"""
