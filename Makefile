# The commands of the README. Each installs .venv on first use (idempotent).
.PHONY: demo test quick install

install:
	@scripts/bootstrap.sh

demo: install
	.venv/bin/aphq demo

test: install
	.venv/bin/python -m pytest -q

quick: install
	.venv/bin/python -m pytest -q -m "not slow"
