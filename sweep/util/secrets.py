"""Which environment variables are credentials, and URIs with their passwords hidden.

A sweep's runtime env, its trial context and Tune's experiment state are all written to
places other people read (Ray's session logs and dashboard, the `--storage` folder that
becomes a bucket on a cluster), so nothing named here goes into any of them."""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

# Known by name; and anything whose name says it is one.
SECRET_NAMES = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"})
_SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD")


def is_secret(name: str) -> bool:
    upper = name.upper()
    return upper in SECRET_NAMES or any(word in upper for word in _SECRET_WORDS) or upper.endswith("_KEY")


def _with_netloc(parts: SplitResult, netloc: str) -> str:
    return parts._replace(netloc=netloc).geturl()


def _host(parts: SplitResult) -> str:
    return parts.netloc.rsplit("@", 1)[-1]


def redact_uri(uri: str) -> str:
    """`http://user:pass@host` -> `http://user:***@host`; anything else unchanged."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc or parts.password is None:
        return uri
    return _with_netloc(parts, f"{parts.username or ''}:***@{_host(parts)}")


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """A tracking URI without its `user:password@`, and MLflow's own variables for them
    (`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`, which MLflow's client reads), so
    the URI can be stored and shown while the password travels only as a secret."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc or not parts.scheme.startswith("http"):
        return uri, {}
    creds = {}
    if parts.username:
        creds["MLFLOW_TRACKING_USERNAME"] = parts.username
    if parts.password is not None:
        creds["MLFLOW_TRACKING_PASSWORD"] = parts.password
    return _with_netloc(parts, _host(parts)), creds
