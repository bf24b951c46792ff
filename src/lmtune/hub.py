"""Hub ids (models, datasets): downloaded when the hub answers, read from the local cache otherwise.

HF_HUB_OFFLINE decides when the user sets it: 1 keeps every load to the cache, 0 allows the
network. Unset, lmtune starts every library offline (runtime.configure) and allows the network only
around a hub id's load, and only when the hub endpoint (HF_ENDPOINT, default huggingface.co) accepts
a connection; otherwise the id comes from the cache, and a missing one is named with how to get it.
Local folders and the built-in `default` model never reach this module.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

# Set by runtime.configure when HF_HUB_OFFLINE=1 is lmtune's default rather than the user's choice;
# an environment variable so that child processes (compare) inherit the distinction.
AUTO_MARKER = "LMTUNE_HUB_AUTO"
_OFF_VALUES = ("0", "false", "no", "off")


def endpoint() -> str:
    """The endpoint the hub libraries use (HF_ENDPOINT as read when they were imported)."""
    import huggingface_hub.constants

    return huggingface_hub.constants.ENDPOINT.rstrip("/")


@lru_cache(maxsize=None)
def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=3).close()
    except (OSError, TypeError):
        return False
    return True


def hub_online() -> bool:
    """Whether a hub id may be downloaded now (see the module docstring)."""
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if os.environ.get(AUTO_MARKER) == "1" or not value:
        return _reachable(endpoint())
    return value in _OFF_VALUES


def why_offline() -> str:
    """The reason a hub id was looked for in the cache only, for error messages."""
    if os.environ.get(AUTO_MARKER) != "1" and os.environ.get("HF_HUB_OFFLINE", "").strip():
        return "offline: HF_HUB_OFFLINE=1 keeps lmtune to the local cache"
    return f"offline: the hub ({endpoint()}) cannot be reached"


def how_to_get(repo_id: str, repo_type: str = "model", revision: str | None = None) -> str:
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    kind += f" --revision {revision}" if revision else ""
    return (f"download it on a machine with network: `hf download {repo_id}{kind}` (HF_HOME must "
            "point to the same cache here), or run where the hub is reachable, with HF_HUB_OFFLINE "
            "unset or HF_HUB_OFFLINE=0.")


@contextmanager
def hub_access() -> Iterator[bool]:
    """The hub libraries read HF_HUB_OFFLINE once, at import, so the decision is applied to their
    constants around each load; yields whether the network is allowed."""
    import datasets.config
    import huggingface_hub.constants

    online = hub_online()
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = not online
    try:
        yield online
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


# What a model folder needs: config, tokenizer files and safetensors weights. Pickle weights are
# never fetched (lmtune refuses to load them).
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


def model_snapshot(repo_id: str, what: str, revision: str | None = None) -> str:
    """A hub model (or adapter) id -> its local snapshot folder at `revision` (a branch, tag or
    commit; default main), downloaded when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    from lmtune.errors import ModelError

    with hub_access() as online:
        try:
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES)
        except HFValidationError as exc:
            raise ModelError(f"{what}: '{repo_id}' is neither a local folder nor a valid hub id "
                             f"({str(exc).splitlines()[0]}).", "check the path or the id.") from None
        except Exception as exc:  # not cached, unknown repo, gated, network failure
            where = "on the hub" if online else f"in the local HF cache ({why_offline()})"
            at = f" at revision '{revision}'" if revision else ""
            raise ModelError(f"{what}: '{repo_id}'{at} is not {where} "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).",
                             how_to_get(repo_id, revision=revision)) from None
    names = {p.name for p in Path(folder).rglob("*") if p.is_file()}
    missing = [label for label, present in (
        ("config.json", "config.json" in names or "adapter_config.json" in names),
        ("*.safetensors weights", any(n.endswith(".safetensors") for n in names))) if not present]
    if missing:
        raise ModelError(f"{what}: the cached copy of '{repo_id}' in {folder} lacks "
                         f"{' and '.join(missing)}.", how_to_get(repo_id, revision=revision))
    return folder

