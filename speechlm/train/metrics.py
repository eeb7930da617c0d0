"""Per-step throughput metrics Bridge does not log: tokens/s per GPU, MFU and peak GPU memory.

Bridge already logs loss, LR, grad norm and TFLOP/s per GPU; this callback adds, every step,
`throughput/tokens_per_sec_per_gpu`, `throughput/mfu` (model FLOPs / the GPU's peak dense bf16
FLOP/s, `speechlm.peak_tflops_per_gpu`, 989 for an H100 SXM) and `memory/max_allocated_gib`.
"""

from __future__ import annotations

import time

import torch
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.utils.flop_utils import num_floating_point_operations
from megatron.bridge.utils.common_utils import print_rank_last


class ThroughputMetrics(Callback):
    def __init__(self, peak_tflops_per_gpu: float, world_size: int):
        self.peak_tflops = peak_tflops_per_gpu
        self.world_size = world_size
        self._last: float | None = None

    def on_train_step_start(self, context) -> None:
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_step_end(self, context) -> None:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        cfg = context.state.cfg
        gbs, step = cfg.train.global_batch_size, context.state.train_state.step
        tokens_per_gpu = gbs * cfg.dataset.seq_length / seconds / self.world_size
        tflops_per_gpu = num_floating_point_operations(cfg, gbs) / seconds / self.world_size / 1e12
        metrics = {
            "throughput/tokens_per_sec_per_gpu": tokens_per_gpu,
            "throughput/mfu": tflops_per_gpu / self.peak_tflops,
            "memory/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        writer = context.state.tensorboard_logger
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(k, v, step)
        if context.state.wandb_logger is not None:
            context.state.wandb_logger.log(metrics, step)
        if step % cfg.logger.log_interval == 0:
            print_rank_last(f" step {step} | tokens/s/GPU {tokens_per_gpu:,.0f} | MFU {100 * metrics['throughput/mfu']:.1f} % "
                            f"| max GPU memory {metrics['memory/max_allocated_gib']:.2f} GiB")
