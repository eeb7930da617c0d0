"""Text-to-speech SFT (issue 8): packed rows, loss on speech only, no attention across pairs.
The SFT recipe's training runs (held-out speech loss falls, SIGTERM + resume reproduces) are a
row of the recipe matrix in tests/test_recipes.py.

The Megatron-model checks run in a subprocess (`python tests/test_sft.py model-check ...`) so that
this pytest process never switches on Bridge's CPU mode.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # when run as a script

from conftest import REPO  # noqa: E402
from speechlm import token_layout as tl  # noqa: E402
from speechlm.data.sft_packing import PackedTTSDataset, build_row, pack_rows, row_to_sample  # noqa: E402
from speechlm.token_layout import TokenLayout  # noqa: E402


def _pairs(layout: TokenLayout, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [layout.tts_document(rng.integers(1_000, 20_000, int(rng.integers(1, 6))),
                                rng.integers(0, tl.CODEC_SIZE, int(rng.integers(3, 12))),
                                str(rng.choice(["hi", "ta", "en"])))
            for _ in range(n)]


# --- rows ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("language_tags", [True, False])
def test_loss_mask_is_exactly_the_speech_of_every_pair(language_tags):
    layout = TokenLayout(language_tags=language_tags)
    docs = _pairs(layout, 3)
    seq_length = sum(map(len, docs)) + 5  # room for padding
    row = build_row(docs, seq_length, layout)
    for thd in (False, True):
        s = row_to_sample(row, thd)
        labels, mask = s["labels"].numpy(), s["loss_mask"].numpy()
        # The targets are the codes and <|speech_end|>, and nothing else: not <|speech_start|>,
        # text, BOS, language tags, EOD or padding.
        speech = tl.is_speech(labels) | (labels == layout.speech_end_id)
        assert np.array_equal(mask == 1, speech)
        assert mask.sum() == sum(len(layout.decode_document(d).codes) + 1 for d in docs)
        for not_target in (layout.speech_start_id, layout.bos_id, layout.eod_id, layout.pad_id,
                           *(layout.specials[f"<|lang_{x}|>"] for x in ("hi", "ta", "en"))):
            assert not mask[labels == not_target].any()
        assert (labels == layout.pad_id).sum() >= 4 and (s["tokens"].numpy()[-4:] == layout.pad_id).all()
        # Positions restart at every pair and at the padding.
        starts = np.cumsum([0] + [len(d) for d in docs])
        pos = s["position_ids"].numpy()
        assert (pos[starts] == 0).all() and pos[starts[1] - 1] == len(docs[0]) - 1
    thd, cpu = row_to_sample(row, True), row_to_sample(row, False)
    n = int(thd["cu_seqlens_argmin"])
    assert thd["cu_seqlens"][:n].tolist() == [*starts.tolist(), seq_length] and (thd["cu_seqlens"][n:] == -1).all()
    assert int(thd["max_seqlen"]) == max(map(len, docs))
    # The CPU form's mask is the same boundaries: causal within a segment, nothing across.
    segment = np.searchsorted(thd["cu_seqlens"][:n].numpy(), np.arange(seq_length), side="right")
    allowed = (segment[:, None] == segment[None, :]) & np.tri(seq_length, dtype=bool)
    assert np.array_equal(~cpu["attention_mask"][0].numpy(), allowed)
    assert "attention_mask" not in thd and "cu_seqlens" not in cpu


def test_a_row_exactly_full_has_no_padding_segment():
    layout = TokenLayout()
    docs = _pairs(layout, 2, seed=3)
    seq_length = sum(map(len, docs)) - 1  # rows are seq_length + 1 tokens
    s = row_to_sample(build_row(docs, seq_length, layout), True)
    assert s["cu_seqlens"][: int(s["cu_seqlens_argmin"])].tolist() == [0, len(docs[0]), seq_length]
    assert s["labels"][-1] == layout.eod_id and s["loss_mask"][-2] == 1  # the last <|speech_end|> is a target
    with pytest.raises(ValueError, match="do not fit"):
        build_row(docs, seq_length - 1, layout)


def test_greedy_packing_keeps_pairs_whole():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, 500)
    order = rng.permutation(500)
    rows = pack_rows(lengths, order, 65)
    assert sorted(d for r in rows for d in r) == list(range(500))  # every pair once
    assert all(lengths[r].sum() <= 65 for r in rows)
    assert lengths.sum() / (65 * len(rows)) > 0.9  # first-fit fills rows
    assert pack_rows(lengths, order, 65) == rows


def test_dataset_order_is_fixed_by_the_seed(synthetic_blend):
    prefix = str(Path(synthetic_blend).parent / "tts_hi_train")
    layout = TokenLayout()
    a = PackedTTSDataset([prefix], 64, 400, seed=7, layout=layout, packed_thd=False)
    b = PackedTTSDataset([prefix], 64, 400, seed=7, layout=layout, packed_thd=False)
    c = PackedTTSDataset([prefix], 64, 400, seed=8, layout=layout, packed_thd=False)
    assert len(a) >= 400 and a.epochs >= 2 and a.dropped == 0
    assert all(np.array_equal(a.row(i).tokens, b.row(i).tokens) for i in (0, 5, len(a) - 1))
    assert not np.array_equal(a.row(0).tokens, c.row(0).tokens)
    one = PackedTTSDataset([prefix], 64, 1, seed=7, layout=layout, packed_thd=False)
    assert one.epochs == 1 and sorted(one._row_docs.tolist()) == list(range(one.pairs))  # every pair once


# --- a real Megatron GPTModel on a packed row (subprocess) ----------------------------------------


def _model_check(model_dir: str, blend: str, out: str) -> None:
    from speechlm.train import megatron_env

    megatron_env.init_single_process_env()
    import torch
    import torch.distributed as dist
    from megatron.bridge import AutoBridge
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from speechlm.train import sft, run as train
    from speechlm.data.sft_packing import speech_span

    dist.init_process_group(megatron_env.distributed_backend())
    parallel_state.initialize_model_parallel(1)
    model_parallel_cuda_manual_seed(0)
    provider = AutoBridge.from_hf_pretrained(model_dir, torch_dtype=torch.float32).to_megatron_provider(load_weights=True)
    megatron_env.adapt_provider(provider)
    provider.params_dtype, provider.bf16, provider.fp16 = torch.float32, False, False
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)[0].eval()

    layout = TokenLayout.load(model_dir)
    docs = _pairs(layout, 3, seed=1)
    seq_length = sum(map(len, docs)) + 6
    s = row_to_sample(build_row(docs, seq_length, layout), packed_thd=False)
    starts = np.cumsum([0] + [len(d) for d in docs])

    def run(tokens, mask, labels=None, pos=None):
        pos = torch.arange(tokens.shape[-1]) if pos is None else pos
        with torch.no_grad():
            return model(input_ids=tokens[None], position_ids=pos[None], attention_mask=mask[None],
                         labels=None if labels is None else labels[None])[0]

    logits = run(s["tokens"], s["attention_mask"], pos=s["position_ids"])
    report = {}
    # Another token in pair 0 (a text token) leaves the logits of pairs 1, 2 and the padding as they were.
    changed = s["tokens"].clone()
    changed[2] = 4242 if changed[2] != 4242 else 4243
    other = run(changed, s["attention_mask"], pos=s["position_ids"])
    report["other_pairs_max_diff"] = float((other[starts[1]:] - logits[starts[1]:]).abs().max())
    report["same_pair_max_diff"] = float((other[2:starts[1]] - logits[2:starts[1]]).abs().max())

    # Each pair alone (its own causal sequence) gives the same logits and the same speech loss.
    causal = torch.triu(torch.ones(1, seq_length, seq_length, dtype=torch.bool), 1)
    alone_sum, alone_n, diffs = 0.0, 0, []
    for d, o in zip(docs, starts):
        t = torch.from_numpy(d.astype(np.int64))
        n = len(d) - 1
        m = causal[:, :n, :n]
        diffs.append(float((run(t[:-1], m) - logits[o: o + n]).abs().max()))
        a, b = speech_span(d, layout)
        per_token = run(t[:-1], m, labels=t[1:])
        alone_sum += float(per_token[a - 1: b - 1].sum())
        alone_n += b - a
    report["alone_vs_packed_logits_max_diff"] = max(diffs)

    per_token = run(s["tokens"], s["attention_mask"], labels=s["labels"], pos=s["position_ids"])
    mask = s["loss_mask"]
    packed = float((per_token * mask).sum() / mask.sum())
    report["packed_loss"], report["alone_loss"] = packed, alone_sum / alone_n
    # Any other label where the mask is 0 leaves the loss as it was.
    g = torch.Generator().manual_seed(0)
    labels2 = torch.where(mask.bool(), s["labels"], torch.randint(0, tl.VOCAB_SIZE, s["labels"].shape, generator=g))
    per_token2 = run(s["tokens"], s["attention_mask"], labels=labels2, pos=s["position_ids"])
    report["masked_labels_changed"] = int((labels2 != s["labels"]).sum())
    report["loss_after_masked_label_change"] = float((per_token2 * mask).sum() / mask.sum())
    labels3 = s["labels"].clone()
    labels3[int(mask.nonzero()[0])] = 5  # and a target label does change it
    report["loss_after_target_label_change"] = float((run(s["tokens"], s["attention_mask"], labels=labels3,
                                                          pos=s["position_ids"]) * mask).sum() / mask.sum())

    # The pretraining run's final LR: provenance.json, then run_config.yaml, then the PT recipe.
    ckpt = Path(out).parent / "pt_ckpt"
    (ckpt / "iter_0000040").mkdir(parents=True, exist_ok=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("40")
    (ckpt / "iter_0000040" / "run_config.yaml").write_text("optimizer:\n  min_lr: 2.0e-05\n")
    report["lr_run_config"] = sft.pretraining_final_lr(str(ckpt), "smoke.yaml")[0]
    (ckpt / "iter_0000040" / "provenance.json").write_text(json.dumps({"recipe": {"optimizer": {"min_lr": 1.5e-5}}}))
    report["lr_provenance"] = sft.pretraining_final_lr(str(ckpt), "smoke.yaml")[0]
    report["lr_recipe"] = sft.pretraining_final_lr(model_dir, "pretrain_llama32_1b.yaml")[0]
    common = [f"speechlm.hf_model={model_dir}", f"speechlm.blend={blend}", "checkpoint.save=/tmp/unused"]
    for name, extra in (("default", []), ("other_lr", ["optimizer.lr=3e-3"]), ("from_pt", [f"checkpoint.pretrained_checkpoint={ckpt}"])):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            cfg, _, _ = train.build_config(train.load_recipe(REPO / "recipes/sft_smoke.yaml",
                                                             [f"checkpoint.pretrained_checkpoint={model_dir}", *common, *extra]), 2)
        report[f"warning_{name}"] = err.getvalue()
    try:  # a recipe that cannot work fails before any training, saying what to change
        train.build_config(train.load_recipe(REPO / "recipes/sft_smoke.yaml", [*common, "model.calculate_per_token_loss=false",
                                                                             "checkpoint.pretrained_checkpoint=null"]), 2)
        report["refused"] = ""
    except train.RecipeError as e:
        report["refused"] = str(e)
    report["dataset_type"] = type(cfg.dataset).__name__
    report["per_token_loss"] = [cfg.model.calculate_per_token_loss, cfg.ddp.average_in_collective]
    Path(out).write_text(json.dumps(report, indent=2))


@pytest.mark.slow
def test_packed_row_through_a_megatron_gpt_model(expanded_tiny_dir, synthetic_blend, tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, __file__, "model-check", str(expanded_tiny_dir), str(synthetic_blend), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["other_pairs_max_diff"] == 0.0, r  # no attention across pairs
    assert r["same_pair_max_diff"] > 1e-4, r  # (the change did reach its own pair)
    assert r["alone_vs_packed_logits_max_diff"] < 1e-4, r  # fp32; RoPE is relative
    assert abs(r["packed_loss"] - r["alone_loss"]) < 1e-5, r
    assert r["masked_labels_changed"] > 10 and r["loss_after_masked_label_change"] == r["packed_loss"], r
    assert r["loss_after_target_label_change"] != r["packed_loss"], r
    assert r["lr_run_config"] == 2e-5 and r["lr_provenance"] == 1.5e-5 and r["lr_recipe"] == 1.5e-5, r
    assert "WARNING" not in r["warning_default"], r  # smoke: 3e-4 = smoke.yaml's final LR
    assert "optimizer.lr=0.003 differs from the pretraining run's final LR 0.0003" in r["warning_other_lr"], r
    assert "differs from the pretraining run's final LR 1.5e-05 (from " in r["warning_from_pt"], r
    assert "provenance.json" in r["warning_from_pt"], r
    assert "set model.calculate_per_token_loss=true" in r["refused"], r
    assert "set checkpoint.pretrained_checkpoint" in r["refused"], r
    assert r["dataset_type"] == "PackedTTSDatasetConfig" and r["per_token_loss"] == [True, False], r


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "model-check":
    _model_check(*sys.argv[2:])
