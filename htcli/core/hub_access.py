"""Reading Hub repos through huggingface_hub, in bounded time, with one-line failures.

Every read asks the Hub once for the repo's file list at the revision (`HfApi.repo_info`, with
huggingface_hub's own timeout, $HF_HUB_ETAG_TIMEOUT, and no retries), then downloads with
`hf_hub_download` into the Hub cache. When the Hub cannot be reached (no connection, a timeout,
a server error) and the repo is in the cache at that revision, the cached files are used, with
one `HubCacheWarning`; otherwise each failure is one `HubError` line naming the repo and what to
do. `HF_HUB_OFFLINE=1` or `local_files_only=True` read the cache only, without asking.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from htcli.errors import HTError


class HubError(HTError, OSError):
    """A Hub repo could not be read: no access, no network, no such repo or revision."""


class HubCacheWarning(UserWarning):
    """The Hub could not be reached; the files come from the Hub cache."""


@dataclass(frozen=True)
class HubOptions:
    """How to read a Hub repo, as diffusers' `from_pretrained` takes it."""

    revision: str | None = None  # a branch, tag or commit; None: the default branch
    token: str | bool | None = None  # None: the login (`hf auth login`, $HF_TOKEN)
    cache_dir: str | Path | None = None  # None: huggingface_hub's cache ($HF_HUB_CACHE)
    local_files_only: bool = False
    force_download: bool = False

    def with_revision(self, revision: str | None, where: str) -> HubOptions:
        """These options with the revision a reference names (`user/repo@v1`): it must agree with `revision=`."""
        if revision is None or revision == self.revision:
            return self
        if self.revision is not None:
            raise HTError(f"{where} names revision {revision!r} but revision={self.revision!r} was given; give one")
        return HubOptions(revision, self.token, self.cache_dir, self.local_files_only, self.force_download)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _at(repo_id: str, hub: HubOptions) -> str:
    return f"Hub repo {repo_id}" + (f" at revision {hub.revision!r}" if hub.revision else "")


def _unreachable(error: BaseException) -> bool:
    """Whether `error` means the Hub could not be asked (the cache may still answer)."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, HfHubHTTPError):
        return error.response is not None and error.response.status_code >= 500
    return isinstance(error, (httpx2.TransportError, OfflineModeIsEnabled, ConnectionError, TimeoutError))


def explain(error: BaseException, repo_id: str, hub: HubOptions) -> HubError:
    """The one line a failed Hub read becomes: what happened to which repo, and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    at, url = _at(repo_id, hub), f"{constants.ENDPOINT}/{repo_id}"
    login = "log in (`hf auth login`, $HF_TOKEN, or token=)"
    status = error.response.status_code if isinstance(error, HfHubHTTPError) and error.response is not None else None
    if isinstance(error, GatedRepoError):
        return HubError(f"{at} is gated: accept its conditions at {url} and {login} with that account")
    if isinstance(error, RevisionNotFoundError):
        return HubError(f"{at}: the repo has no such revision; give a branch, tag or commit it has (see {url})")
    if isinstance(error, RepositoryNotFoundError) or status in (401, 404):
        return HubError(f"{at} was not found, or it is private and you are not logged in: check the repo id, "
                        f"or {login}")
    if status == 403:
        return HubError(f"{at}: access denied (403); {login} with a token that can read it")
    if _unreachable(error):
        reason = f"HTTP {status}" if status else type(error).__name__
        return HubError(f"could not reach the Hub at {constants.ENDPOINT} for {at} ({reason}), and it is not in the "
                        f"Hub cache: check the connection (or $HF_ENDPOINT) and retry")
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return HubError(f"{at} could not be read: {type(error).__name__}: {first}")


def repo_files(repo_id: str, repo_type: str, hub: HubOptions) -> list[str] | None:
    """The repo's file paths at the revision, asked of the Hub; None: read the Hub cache instead
    (offline, `local_files_only`, or the Hub unreachable with the repo cached: one warning)."""
    from huggingface_hub import HfApi, constants

    if offline() or hub.local_files_only:
        return None
    try:
        info = HfApi(endpoint=constants.ENDPOINT).repo_info(repo_id, repo_type=repo_type, revision=hub.revision,
                                                            token=hub.token, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:  # noqa: BLE001 - every failure becomes one line (or the cache)
        if _unreachable(error) and cached_snapshot(repo_id, repo_type, hub) is not None:
            warnings.warn(f"could not reach the Hub at {constants.ENDPOINT} for {_at(repo_id, hub)} "
                          f"({type(error).__name__}); using the files in the Hub cache", HubCacheWarning, stacklevel=2)
            return None
        raise explain(error, repo_id, hub) from None
    return [sibling.rfilename for sibling in info.siblings or []]


def cached_snapshot(repo_id: str, repo_type: str, hub: HubOptions, patterns: list[str] | None = None) -> Path | None:
    """The repo's snapshot folder in the Hub cache at the revision (files matching `patterns`); None if not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=hub.revision, cache_dir=hub.cache_dir,
                                      local_files_only=True, allow_patterns=patterns))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None


def download(repo_id: str, filename: str, folder: str | None, repo_type: str, hub: HubOptions,
             from_cache: bool) -> Path:
    """The file through the Hub cache (`hf_hub_download`); `from_cache`: without asking the Hub.
    Raises huggingface_hub's errors (the caller explains them)."""
    from huggingface_hub import constants, hf_hub_download

    return Path(hf_hub_download(repo_id, filename, subfolder=folder, repo_type=repo_type, revision=hub.revision,
                                token=hub.token, cache_dir=hub.cache_dir, local_files_only=from_cache,
                                force_download=hub.force_download and not from_cache, endpoint=constants.ENDPOINT))
