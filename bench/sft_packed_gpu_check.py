"""GPU check of SFT packing: packed THD rows through TransformerEngine attention give the loss of
the pairs run one by one (within bf16 tolerance), and no pair sees another.

    python bench/sft_packed_gpu_check.py                 # GPU: TE layer spec, THD PackedSeqParams, bf16
    python bench/sft_packed_gpu_check.py --local         # CPU (or GPU): local spec + block-diagonal mask, fp32
    python bench/sft_packed_gpu_check.py --hf-model DIR  # a converted/expanded model instead of a random one

The packed batch goes the way Bridge's training step takes it: speechlm.data.sft_packing rows, default
collation, `gpt_step.get_batch_from_iterator`, `_packed_metadata_for_forward` and
`get_packed_seq_params`. Prints a JSON report; exits 1 when a check fails. See docs/sft.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speechlm.train import megatron_env  # noqa: E402  (CPU mode before any megatron.bridge import)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _model(args, dtype: torch.dtype):
    if args.hf_model:
        from megatron.bridge import AutoBridge

        provider = AutoBridge.from_hf_pretrained(args.hf_model, torch_dtype=dtype).to_megatron_provider(load_weights=True)
        megatron_env.adapt_provider(provider)
        if args.local:
            from megatron.bridge.models.gpt_provider import local_layer_spec

            provider.transformer_layer_spec, provider.transformer_impl = local_layer_spec, "local"
        provider.params_dtype, provider.bf16, provider.fp16 = dtype, dtype == torch.bfloat16, False
        provider.finalize()
        return provider.provide_distributed_model(wrap_with_ddp=False)[0].eval()

    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    from speechlm.token_layout import VOCAB_SIZE

    # A small Llama-3-shaped model (RMSNorm, SwiGLU, GQA, RoPE base 500000) with random weights.
    config = TransformerConfig(
        num_layers=2, hidden_size=256, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=1024,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0,
        masked_softmax_fusion=False, bias_activation_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
    )
    spec = get_gpt_layer_local_spec(normalization="RMSNorm") if args.local else get_gpt_layer_with_transformer_engine_spec()
    model = GPTModel(config, spec, vocab_size=VOCAB_SIZE, max_sequence_length=args.seq_length,
                     position_embedding_type="rope", rotary_base=500_000, share_embeddings_and_output_weights=True)
    return model.to(device="cuda", dtype=dtype).eval()


def _pairs(n: int, seq_length: int, seed: int) -> list[np.ndarray]:
    from speechlm.token_layout import CODEC_SIZE, TokenLayout

    # n pairs of at most seq_length // n tokens each, so the row has some padding too.
    layout, rng, budget = TokenLayout(), np.random.default_rng(seed), seq_length // n
    text = [int(rng.integers(2, budget // 4)) for _ in range(n)]
    return [layout.tts_document(rng.integers(1_000, 20_000, t),
                                rng.integers(0, CODEC_SIZE, int(rng.integers(budget // 3, budget - t - layout.tts_overhead))))
            for t in text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local", action="store_true", help="local layer spec + attention mask (the CPU form)")
    parser.add_argument("--hf-model", help="an HF model directory (expanded vocabulary) instead of a random model")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=None, help="loss tolerance (default 1e-2 bf16, 1e-5 fp32)")
    args = parser.parse_args(argv)
    if not args.local and not megatron_env.cpu_compat.cuda_present():
        sys.exit("the THD/TransformerEngine check needs a GPU; use --local for the CPU form")

    megatron_env.init_single_process_env()
    import torch.distributed as dist
    from megatron.bridge.training import gpt_step
    from megatron.bridge.training.utils.packed_seq_utils import get_packed_seq_params
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from speechlm.data.sft_packing import build_row, row_to_sample, speech_span
    from speechlm.token_layout import TokenLayout

    dist.init_process_group(megatron_env.distributed_backend())
    parallel_state.initialize_model_parallel(1)
    model_parallel_cuda_manual_seed(args.seed)
    dtype = torch.float32 if args.local else torch.bfloat16
    rtol = args.rtol or (1e-5 if dtype == torch.float32 else 1e-2)
    model = _model(args, dtype)
    layout = TokenLayout.load(args.hf_model) if args.hf_model else TokenLayout()
    docs = _pairs(args.pairs, args.seq_length, args.seed)
    thd = not args.local

    def forward(sample: dict, labels: bool = True) -> torch.Tensor:
        """Bridge's get_batch path on one packed row (micro-batch 1)."""
        batch = torch.utils.data.default_collate([sample])
        batch = gpt_step.get_batch_from_iterator(iter([batch]), skip_getting_attention_mask_from_dataset=thd,
                                                 is_first_pp_stage=True, is_last_pp_stage=True)
        meta = gpt_step._packed_metadata_for_forward(batch)
        with torch.no_grad():
            return model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                         attention_mask=batch.get("attention_mask"), labels=batch["labels"] if labels else None,
                         packed_seq_params=get_packed_seq_params(meta) if meta else None)[0].float()

    row = build_row(docs, args.seq_length, layout)
    sample = row_to_sample(row, thd)
    mask = sample["loss_mask"].cuda()
    packed_loss = float((forward(sample) * mask).sum() / mask.sum())
    logits = forward(sample, labels=False)

    starts = np.cumsum([0] + [len(d) for d in docs])
    total, count, logit_diffs = 0.0, 0, []
    for d, o in zip(docs, starts):
        t = torch.from_numpy(d.astype(np.int64)).cuda()
        n = len(d) - 1
        with torch.no_grad():  # the pair alone: a plain causal sequence, no packing metadata
            causal = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool, device=t.device), 1) if args.local else None
            pos = torch.arange(n, device=t.device)[None]
            per_token = model(input_ids=t[None, :-1], position_ids=pos, attention_mask=causal, labels=t[None, 1:])[0].float()
            alone = model(input_ids=t[None, :-1], position_ids=pos, attention_mask=causal)[0].float()
        a, b = speech_span(d, layout)
        total += float(per_token[a - 1: b - 1].sum())
        count += b - a
        logit_diffs.append(float((alone - logits[o: o + n]).abs().max()))
    unpacked_loss = total / count

    changed = dict(sample, tokens=sample["tokens"].clone())
    changed["tokens"][1] += 1  # a text token of the first pair
    other = forward(changed, labels=False)
    cross = float((other[starts[1]:] - logits[starts[1]:]).abs().max())

    report = {
        "device": torch.cuda.get_device_name() if megatron_env.cpu_compat.cuda_present() else "cpu",
        "form": "THD PackedSeqParams, TransformerEngine" if thd else "attention mask, local spec",
        "dtype": str(dtype), "pairs": len(docs), "row_tokens": args.seq_length + 1,
        "loss_tokens": int(mask.sum()), "packed_loss": packed_loss, "unpacked_loss": unpacked_loss,
        "rel_diff": abs(packed_loss - unpacked_loss) / abs(unpacked_loss),
        "max_logit_diff_vs_alone": max(logit_diffs), "cross_pair_logit_change": cross,
    }
    report["ok"] = report["rel_diff"] <= rtol and cross <= (1e-6 if dtype == torch.float32 else 1e-2)
    print(json.dumps(report, indent=2))
    dist.destroy_process_group()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
