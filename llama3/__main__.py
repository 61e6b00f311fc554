"""`python -m llama3 ...`, the same as the `llama3` command."""

from llama3.cli import run

run()
