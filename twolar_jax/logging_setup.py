"""Logging for the console entry points: one format, the level the user asked for, secrets redacted.

Why `force=True`: TensorFlow, absl and orbax install root handlers on import, which makes a plain
`logging.basicConfig` a silent no-op and `--log_level` useless.
"""
from __future__ import annotations

import logging

from twolar_jax.errors import OptionError
from twolar_jax.secrets import RedactingFilter, RedactingFormatter

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Root handler on stderr at `level` (DEBUG, INFO, WARNING, ERROR), every record redacted."""
    name = str(level).upper()
    if name not in LEVELS:
        raise OptionError(f"--log_level={level!r}: expected one of {LEVELS}")
    logging.basicConfig(level=name, format=FORMAT, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
        handler.setFormatter(RedactingFormatter(FORMAT))  # tracebacks too, not only the message
    for noisy in ("httpx", "httpcore", "openai", "jax._src", "orbax", "tensorflow", "transformers",
                  "sentence_transformers", "huggingface_hub", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(name)))
    # absl's Python logger carries orbax's and TensorFlow's notes ("Given directory is read only" for every
    # read-only restore): errors only, unless DEBUG.
    logging.getLogger("absl").setLevel(logging.DEBUG if name == "DEBUG" else logging.ERROR)
    # Libraries' Python warnings (deprecations, version notes) reach the console only at DEBUG: a user
    # cannot act on them (console_noise routes them into logging).
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if name == "DEBUG" else logging.ERROR)
