"""The model stage: vocabulary expansion and HF <-> Megatron conversion of the expanded model."""
