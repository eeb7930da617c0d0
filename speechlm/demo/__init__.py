"""The embedded demo (`python -m speechlm.demo`): the whole pipeline at toy size, its synthetic codec and tiny models."""
