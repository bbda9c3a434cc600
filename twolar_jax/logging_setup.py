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
    for noisy in ("httpx", "httpcore", "openai", "absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(name)))
