# The two commands of the README. Each installs .venv on first use (idempotent).
.PHONY: demo test install

install:
	@scripts/bootstrap.sh

demo: install
	.venv/bin/aphq demo

test: install
	.venv/bin/python -m pytest -q
