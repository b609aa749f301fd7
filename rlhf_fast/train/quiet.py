"""transformers' own progress bars and info lines off around our loads and saves."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_transformers():
    """transformers' progress bars ("Loading weights", "Writing model shards") and info lines off
    while we load or save a model, as the CLI has them off: an API run shows our bar alone. The
    caller's settings are restored after, so a notebook's own transformers calls keep theirs."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
