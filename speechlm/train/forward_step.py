"""Bridge's GPT forward step, plus the training loss split by target kind (speech vs text).

The loss that is optimised is Bridge's own (`masked_next_token_loss`, every target token);
"speech loss" and "text loss" are reporting metrics over the targets that are codec tokens
(and `<|speech_end|>`) and over every other target (text tokens, BOS/EOD, `<|speech_start|>`,
language tags). A metric whose kind has no targets in a whole global
batch reads NaN for that step.

Per-set validation (speechlm.train.validation): in evaluation (the model in eval mode) a batch
that carries a `dataset_id` per sample (megatron-core's BlendedDataset adds one to each sample;
so does validation's per-set blend) has each sample's summed loss, token count and mean loss
added to `PER_SET`, a [sets, 5] accumulator the validation callback resets before its pass and
reduces across data-parallel ranks after it. Training batches are never attributed.
"""

from __future__ import annotations

from functools import partial

import torch

from speechlm import token_layout as tl

# Megatron-Bridge is imported where it is used: the per-set statistics below are plain torch, and
# tests read them in a process that never switches on the CPU mode (speechlm.train.megatron_env).


class PerSetAccumulator:
    """Per-set sums over one evaluation: columns are COLUMNS (summed over micro-batches here, over
    data-parallel ranks by the caller). Inactive (n_sets 0) unless the validation callback starts it."""

    COLUMNS = ("loss_sum", "tokens", "samples", "mean_sum", "mean_sq_sum")

    def __init__(self):
        self.n_sets = 0
        self.stats: torch.Tensor | None = None

    def start(self, n_sets: int) -> None:
        self.n_sets, self.stats = n_sets, None

    def stop(self) -> torch.Tensor:
        """The sums ([n_sets, 5], zeros where this rank computed no loss); accumulation ends."""
        stats = self.stats if self.stats is not None else torch.zeros(self.n_sets, len(self.COLUMNS), dtype=torch.float64).cuda()
        self.n_sets, self.stats = 0, None
        return stats

    def add(self, dataset_id: torch.Tensor, losses: torch.Tensor, loss_mask: torch.Tensor) -> None:
        """Add one micro-batch: `losses` / `loss_mask` [b, s] per token, `dataset_id` [b]."""
        per_sample_stats = per_sample(losses, loss_mask)
        if self.stats is None:
            self.stats = torch.zeros(self.n_sets, len(self.COLUMNS), dtype=torch.float64, device=losses.device)
        ids = dataset_id.view(-1).to(device=losses.device, dtype=torch.long)
        self.stats.index_add_(0, ids, per_sample_stats.to(torch.float64))


def per_sample(losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[b, 5]: each row's summed loss, its loss tokens, 1 (a sample; 0 when it has no loss token),
    its mean loss and that mean squared."""
    b = loss_mask.shape[0]
    mask = loss_mask.reshape(b, -1).float()
    sums = (losses.reshape(b, -1).float() * mask).sum(1)
    tokens = mask.sum(1)
    counted = (tokens > 0).float()
    mean = sums / tokens.clamp(min=1)
    return torch.stack([sums, tokens, counted, mean * counted, mean * mean * counted], dim=1).detach()


def per_set_results(stats) -> list[dict | None]:
    """Per set: {loss (token-weighted, as Bridge's lm loss), stderr (of the mean of per-sample
    means: sd / sqrt(n)), samples, tokens}, or None for a set with no loss token."""
    out = []
    for loss_sum, tokens, n, mean_sum, sq_sum in stats.double().cpu().tolist():
        if tokens <= 0 or n <= 0:
            out.append(None)
            continue
        mean = mean_sum / n
        var = max(0.0, (sq_sum - n * mean * mean) / (n - 1)) if n > 1 else float("nan")
        out.append({"loss": loss_sum / tokens, "stderr": (var / n) ** 0.5, "samples": int(n), "tokens": int(tokens)})
    return out


PER_SET = PerSetAccumulator()


def speech_target_mask(labels: torch.Tensor) -> torch.Tensor:
    return (labels >= tl.CODEC_OFFSET) | (labels == tl.TokenLayout().speech_end_id)


def _loss_by_kind(loss_mask: torch.Tensor, speech: torch.Tensor, output_tensor, dataset_id=None, **checks):
    from megatron.bridge.training.losses import masked_next_token_loss

    loss, num_tokens, report = masked_next_token_loss(loss_mask, output_tensor, **checks)
    if dataset_id is not None and PER_SET.n_sets:
        PER_SET.add(dataset_id, output_tensor.view(loss_mask.shape), loss_mask)
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    speech = speech.view(-1).float() * mask
    text = mask - speech
    for name, kind in (("speech loss", speech), ("text loss", text)):
        report[name] = torch.stack([(losses * kind).sum(), kind.sum()]).detach()
    return loss, num_tokens, report


class _KeepDatasetId:
    """The data iterator, noting each batch's `dataset_id` (dropped by Bridge's get_batch)."""

    def __init__(self, iterator, into: dict):
        self.iterator, self.into = iterator, into

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.iterator)
        if isinstance(b, dict):
            self.into["dataset_id"] = b.get("dataset_id")
        return b


def forward_step(state, data_iterator, model, return_schedule_plan: bool = False):
    from megatron.bridge.training import gpt_step

    batch = {}

    def get_batch_keeping_labels(data_iterator, *args, **kwargs):
        out = gpt_step.get_batch(_KeepDatasetId(data_iterator, batch) if data_iterator is not None else None,
                                 *args, **kwargs)
        batch["labels"] = out[1]
        return out

    # Bridge's private forward helper (pinned 0.6.2) accepts our batch function, so the model
    # call, packing and FLOP accounting stay Bridge's own.
    output, loss_mask = gpt_step._forward_step_common(
        state, data_iterator, model, return_schedule_plan, _get_batch_fn=get_batch_keeping_labels
    )
    if return_schedule_plan or batch.get("labels") is None:
        return output, gpt_step._create_loss_function(
            loss_mask,
            check_for_nan_in_loss=state.cfg.rerun_state_machine.check_for_nan_in_loss,
            check_for_spiky_loss=state.cfg.rerun_state_machine.check_for_spiky_loss,
        )
    return output, partial(
        _loss_by_kind,
        loss_mask,
        speech_target_mask(batch["labels"]),
        # Bridge's get_batch keeps only the keys the model reads: the sample's source set is taken
        # from the raw batch (evaluation only).
        dataset_id=batch.get("dataset_id") if PER_SET.n_sets and not model.training else None,
        check_for_nan_in_loss=state.cfg.rerun_state_machine.check_for_nan_in_loss,
        check_for_spiky_loss=state.cfg.rerun_state_machine.check_for_spiky_loss,
    )


forward_step.attributes_dataset_id = True  # speechlm.train.validation: one pass for all sets
