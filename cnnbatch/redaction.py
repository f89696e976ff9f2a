"""Secret hygiene for everything cnnbatch prints or stores: the storage variables that are secret, handing them to
Ray workers without a runtime_env (which Ray logs), and redacting secrets and URL credentials from any text."""

from __future__ import annotations

import os
import re

# Environment variables that configure storage access. They are handed to Ray workers so that actors on other
# nodes reach the same buckets, and never logged or stored.
STORAGE_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCE_", "GCS_", "FSSPEC_", "S3_")
SECRET_ENV_NAMES = re.compile(r"(SECRET|TOKEN|PASSWORD|KEY|CREDENTIAL)", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    return name.startswith(STORAGE_ENV_PREFIXES) and bool(SECRET_ENV_NAMES.search(name))


def storage_env() -> dict[str, str]:
    """The storage settings of this process that are not secret (endpoint, region, profile), for Ray workers'
    ``runtime_env``. Ray's runtime-env agent logs a runtime_env verbatim, so secrets never go there."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES) and not is_secret_name(k)}


class SecretEnv(dict):
    """Secret storage variables (keys, tokens) handed to actors as a constructor argument, applied with
    :meth:`apply`. Its repr names the variables only, so an error or log line that shows it leaks nothing."""

    @classmethod
    def from_environ(cls) -> SecretEnv:
        return cls({k: v for k, v in os.environ.items() if is_secret_name(k)})

    def apply(self) -> None:
        os.environ.update(self)

    def __repr__(self) -> str:
        return f"SecretEnv({', '.join(sorted(self))})"

    __str__ = __repr__


# A URL's scheme and "//"; what follows up to the authority's last "@" is its userinfo (RFC 3986 ends the
# authority at "/", "?" or "#"; a raw "@" in a password is invalid but common, and urllib splits at the last one).
_SCHEME = r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://"
_USERINFO = re.compile(
    rf"({_SCHEME})"
    r"(?:"
    r"[^\s/?#\"'<>]*"  # an authority holding "@": everything before its last "@"
    r"|"
    # "user:password@" whose password holds "/", "?" or "#" unescaped (e.g. an AWS secret key): the authority
    # would end inside the password, so take the whole run up to its last "@" -- unless what follows the colon
    # is a port ("host:8000/path/bob@example.com" stays as it is).
    r"[^\s/?#\"'<>:@\[]+:(?!\d*(?:[/?#\s\"'<>]|$))[^\s\"'<>]*"
    r")@"
)


def redact(text: str) -> str:
    """Remove secret values from the environment and the userinfo of every URL from ``text``.

    ``scheme://anything@host`` becomes ``scheme://***@host`` (a user name alone can be a token); e-mail
    addresses outside URLs and URLs without userinfo are left as they are.
    """
    for name, value in os.environ.items():
        if value and len(value) >= 6 and is_secret_name(name):
            text = text.replace(value, "***")
    return _USERINFO.sub(r"\1***@", text)


# " at 0x7f3a5c2e1d30" in an object's default repr: noise to a user, and an address is no business of a log
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def describe_error(exc: BaseException) -> str:
    """A one-line, secret-free description of an exception (object reprs lose their memory addresses)."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return _ADDRESS.sub("", redact(f"{name}: {message}" if message else name))
