"""speechlm: a Megatron-Bridge training stack for a Llama-3 speech-token language model."""
