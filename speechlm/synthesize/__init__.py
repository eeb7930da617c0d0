"""The speaking stage: text -> speech codes (and audio) with an exported model (`python -m speechlm.synthesize`)."""
