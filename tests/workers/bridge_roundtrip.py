"""HF -> Megatron (AutoBridge) -> HF on a tiny model, under torchrun; rank 0 writes a JSON report.

usage: torchrun --nproc-per-node N tests/workers/bridge_roundtrip.py HF_DIR OUT_DIR
"""

import json
import sys

from speechlm.train import megatron_env  # noqa: F401  (CPU mode before any megatron.bridge import)

import torch
import torch.distributed as dist


def main() -> None:
    hf_dir, out_dir = sys.argv[1], sys.argv[2]
    from megatron.bridge import AutoBridge
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from transformers import AutoModelForCausalLM

    dist.init_process_group(megatron_env.distributed_backend())
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(0)

    bridge = AutoBridge.from_hf_pretrained(hf_dir, torch_dtype=torch.float32)
    provider = bridge.to_megatron_provider(load_weights=True)
    megatron_env.adapt_provider(provider)
    provider.tensor_model_parallel_size = tp
    provider.params_dtype, provider.bf16, provider.fp16 = torch.float32, False, False
    provider.parallel_output = False  # gather the vocabulary shards for the comparison
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    megatron = model[0].eval()

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=generator)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    causal = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool), 1)[None, None]
    with torch.no_grad():
        ref = hf(ids).logits
        got = megatron(input_ids=ids, position_ids=pos, attention_mask=causal)[..., : ref.shape[-1]]

    bridge.save_hf_pretrained(model, out_dir)
    dist.barrier()
    if dist.get_rank() == 0:
        back = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            ref_back = back(ids).logits
        a, b = hf.state_dict(), back.state_dict()
        report = {
            "tp": tp,
            "megatron_vs_hf": (got - ref).abs().max().item(),
            "roundtrip_logits": (ref_back - ref).abs().max().item(),
            "same_keys": sorted(a) == sorted(b),
            "weights_identical": all(torch.equal(a[k], b[k]) for k in a if k in b),
            "vocab_size": hf.config.vocab_size,
        }
        (__import__("pathlib").Path(out_dir) / "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
