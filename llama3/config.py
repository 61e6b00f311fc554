"""Deprecated: `llama3.config` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.checks`,
`llama3.generate.params`,
`llama3.model.config`.
"""

import warnings

from llama3.checks import ConfigError, ParamError, parse_jsonl, read_json_object  # noqa: F401
from llama3.generate.params import SamplingParams, check_max_new_tokens, check_seed  # noqa: F401
from llama3.model.config import PRESETS, ModelArgs, RopeScaling  # noqa: F401

warnings.warn("llama3.config is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2)
