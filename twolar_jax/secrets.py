"""Keep secrets out of files and logs: redaction by value (every registered secret) and by name.

Why by value as well as by name: a key reaches a config through a gin macro (`MYKEY = 'sk-...'`), a URL
(`http://user:KEY@host/v1`) or the environment, and only its value is common to all routes. Components
that hold a secret register it here (`register_secret`); everything written for people (config.gin,
manifests, logs, TensorBoard text, error messages) passes through `redact`.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from typing import Iterable, Optional
from urllib.parse import unquote, urlsplit

REDACTED = "***"
SECRET_ENV_VARS = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_SECRET_NAME_PARTS = {"key", "apikey", "token", "secret", "password", "passwd", "credentials"}
_SECRET_NAME_ENDINGS = ("key", "token", "secret", "password", "passwd", "credentials")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]+)@")
_KEY_LIKE = re.compile(r"\b(sk|key|tok|hf)[-_][A-Za-z0-9_\-*.]{8,}")
_MIN_SECRET_LEN = 4

_lock = threading.Lock()
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so that `redact` removes it wherever it appears."""
    if value and len(value) >= _MIN_SECRET_LEN:
        with _lock:
            _secrets.add(value)


def register_url_credentials(url: Optional[str]) -> Optional[str]:
    """Register the user:password of a URL (`http://user:KEY@host/v1`) as secrets; returns the password."""
    if not url or "@" not in url:
        return None
    try:
        parts = urlsplit(url)
        username, password = parts.username, parts.password
    except ValueError:  # a malformed URL: keep whatever sits before the '@' secret
        userinfo = url.split("://", 1)[-1].split("@", 1)[0]
        register_secret(userinfo)
        return None
    if not password:  # a bare `token@host`: the user part is the credential
        register_secret(username)
        return None
    register_secret(password)  # not the user name alone: "user" must not vanish from every log line
    register_secret(unquote(password))
    register_secret(f"{username}:{password}")
    return unquote(password)


def known_secrets() -> list[str]:
    """Registered secrets plus the secret environment variables, longest first."""
    found = set(_secrets) | {os.environ[v] for v in SECRET_ENV_VARS if len(os.environ.get(v, "")) >= _MIN_SECRET_LEN}
    return sorted(found, key=len, reverse=True)


def is_secret_name(name: str) -> bool:
    """True for names like `api_key`, `ChatClient.token`, `PASSWORD`, `hf_secret`, `MYKEY`, `%OpenAIKey`
    (case-insensitive): the last word of the name ends with key, token, secret or password.

    Only the last word counts, so `pad_token_id` or `max_tokens` are not secret names."""
    last = re.split(r"[./]", name.strip().lstrip("%"))[-1]
    words = [w for w in re.split(r"[_\-]|(?<=[a-z0-9])(?=[A-Z])", last) if w]
    if not words:
        return False
    word = words[-1].lower()
    return word in _SECRET_NAME_PARTS or word.endswith(_SECRET_NAME_ENDINGS)


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with every known secret value, URL userinfo and key-shaped token replaced by ***."""
    for secret in sorted({*known_secrets(), *(s for s in extra if s and len(s) >= _MIN_SECRET_LEN)},
                         key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    return _KEY_LIKE.sub(lambda m: f"{m.group(1)}-{REDACTED}", text)


_BINDING = re.compile(r"^(?P<indent>\s*)(?P<name>[A-Za-z_][\w./%]*)\s*=\s*(?P<value>.*)$")


def redact_gin_config(text: str) -> str:
    """A gin config with secret-named bindings and macros set to None and every secret value removed."""
    out = []
    for line in text.splitlines():
        m = _BINDING.match(line)
        if m and is_secret_name(m.group("name")) and m.group("value").strip() not in ("None", ""):
            line = f"{m.group('indent')}{m.group('name')} = None  # redacted"
        out.append(line)
    return redact("\n".join(out) + ("\n" if text.endswith("\n") else ""))


class RedactingFormatter(logging.Formatter):
    """A formatter whose whole output (message, arguments and any traceback) is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's message (installed by the console entry points)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True
