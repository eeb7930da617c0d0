"""`python -m speechlm.train`: runs speechlm/train/run.py as the main module.

runpy, not an import of main(): a spawned child process (Megatron's persistent async-checkpoint
worker) sets itself up by importing the parent's main module, but never a package's `__main__`.
Run as `speechlm.train.run`, the child imports it, which applies the CPU mode (megatron_env)
before Megatron; without it the worker dies on CPU and the first asynchronous save waits forever.
"""

import runpy

runpy.run_module("speechlm.train.run", run_name="__main__", alter_sys=True)
