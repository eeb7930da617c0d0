# The two commands of the README. Both set up the environment first (idempotent, quick when done).
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python -m speechlm.demo

test: setup
	.venv/bin/python -m pytest
