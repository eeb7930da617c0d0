"""Bridge's GPT forward step, plus the training loss split by target kind (speech vs text).

The loss that is optimised is Bridge's own (`masked_next_token_loss`, every target token);
"speech loss" and "text loss" are reporting metrics over the targets that are codec tokens
(and `<|speech_end|>`) and over every other target (text tokens, BOS/EOD, `<|speech_start|>`,
language tags). A metric whose kind has no targets in a whole global
batch reads NaN for that step.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.bridge.training import gpt_step
from megatron.bridge.training.losses import masked_next_token_loss

from speechlm import token_layout as tl


def speech_target_mask(labels: torch.Tensor) -> torch.Tensor:
    return (labels >= tl.CODEC_OFFSET) | (labels == tl.TokenLayout().speech_end_id)


def _loss_by_kind(loss_mask: torch.Tensor, speech: torch.Tensor, output_tensor, **checks):
    loss, num_tokens, report = masked_next_token_loss(loss_mask, output_tensor, **checks)
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    speech = speech.view(-1).float() * mask
    text = mask - speech
    for name, kind in (("speech loss", speech), ("text loss", text)):
        report[name] = torch.stack([(losses * kind).sum(), kind.sum()]).detach()
    return loss, num_tokens, report


def forward_step(state, data_iterator, model, return_schedule_plan: bool = False):
    batch = {}

    def get_batch_keeping_labels(*args, **kwargs):
        out = gpt_step.get_batch(*args, **kwargs)
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
        check_for_nan_in_loss=state.cfg.rerun_state_machine.check_for_nan_in_loss,
        check_for_spiky_loss=state.cfg.rerun_state_machine.check_for_spiky_loss,
    )
