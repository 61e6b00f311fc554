"""`python -m llama3 ...`, the same as the `llama3` command."""

import sys

from llama3.cli import main

sys.exit(main())
