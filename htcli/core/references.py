"""Local paths or Hugging Face Hub references, resolved to local files through the Hub cache.

Everything that takes an intervention file or a hypernetwork takes either:

    runs/tiny/hyper                        a local folder or file (it wins when it exists)
    user/repo                              a Hub repo: its one file of the kind (or default name)
    user/repo/styles/art_deco.safetensors  a file in a Hub repo, by its path there

and, from Python, `weight_name=` / `subfolder=` as diffusers' `load_lora_weights` takes them.
Downloads go through `huggingface_hub` and its cache, so `HF_HUB_OFFLINE=1` reads the cache only;
whatever cannot be had is one line naming the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from htcli.errors import HTError

SAFETENSORS = "*.safetensors"


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    return (OSError, ValueError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError)


def split_reference(reference: str) -> tuple[str, str | None] | None:
    """("user/repo", "path/in/repo" or None) if `reference` can name a Hub repo, else None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    parts = reference.strip("/").split("/")
    if len(parts) < 2 or reference.startswith(("/", ".", "~")) or "\\" in reference:
        return None
    repo_id = "/".join(parts[:2])
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, "/".join(parts[2:]) or None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _where(reference: str) -> str:
    return ("not in the Hub cache (HF_HUB_OFFLINE is set: the cache only)" if _offline()
            else "not found on the Hub or in its cache")


def _local(path: Path, names: Sequence[str], what: str) -> Path:
    """`path` if it is a file, else the first of `names` in the folder `path`; with no names, the
    folder's one safetensors file."""
    if path.is_file():
        return path
    found = [path / name for name in names if (path / name).is_file()]
    if found:
        return found[0]
    if not names:
        files = sorted(path.glob(SAFETENSORS))
        if len(files) == 1:
            return files[0]
        if files:
            raise HTError(f"{path} holds {len(files)} safetensors files ({', '.join(f.name for f in files)}); "
                          f"name one (weight_name=, or the file's path)")
    wanted = " or ".join(names) if names else "a .safetensors file"
    raise HTError(f"no {what} at {path}: expected {wanted} there")


def resolve_file(reference: str | Path, what: str, names: Sequence[str] = (), weight_name: str | None = None,
                 subfolder: str | None = None, repo_type: str = "model") -> Path:
    """The local file a reference names (see the module docstring), downloading it into the Hub
    cache if need be.

    names: the file names to look for in a folder or repo, in order; none: the one safetensors
        file there. `weight_name` and `subfolder` choose the file explicitly.
    what: the kind of file, for error messages ("intervention file", "hypernetwork")."""
    text = str(reference)
    local = Path(text).expanduser()
    if subfolder:
        local = local / subfolder
    if local.exists():
        return _local(local / weight_name if weight_name else local, names, what)
    split = split_reference(text)
    if split is None:
        raise HTError(f"no {what} at {text}: no such file or folder (and not a Hub repo id like user/repo)")
    repo_id, in_repo = split
    filename = weight_name
    if filename is None and in_repo and in_repo.endswith(".safetensors"):  # user/repo/dir/file.safetensors
        in_repo, _, filename = in_repo.rpartition("/")
    folder = "/".join(part for part in (subfolder, in_repo) if part) or None
    return _download(repo_id, folder, filename, names, what, text, repo_type)


def _download(repo_id: str, folder: str | None, filename: str | None, names: Sequence[str], what: str,
              text: str, repo_type: str) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    if filename is None and names:  # the first default name the repo has
        for name in names:
            try:
                return Path(hf_hub_download(repo_id, name, subfolder=folder, repo_type=repo_type))
            except _hub_errors():
                continue
        raise HTError(f"no {what} at {text}: {' or '.join(names)} in Hub repo {repo_id}"
                      f"{f' folder {folder}' if folder else ''} {_where(text)}")
    try:
        if filename is not None:
            return Path(hf_hub_download(repo_id, filename, subfolder=folder, repo_type=repo_type))
        pattern = f"{folder}/{SAFETENSORS}" if folder else SAFETENSORS
        snapshot = Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=[pattern]))
    except _hub_errors() as error:
        name = "/".join(part for part in (folder, filename) if part) or "its files"
        raise HTError(f"no {what} at {text}: {name} in Hub repo {repo_id} {_where(text)} "
                      f"({type(error).__name__})") from None
    files = sorted((snapshot / folder if folder else snapshot).rglob(SAFETENSORS))
    if len(files) == 1:
        return files[0]
    where = f"Hub repo {repo_id}" + (f" folder {folder}" if folder else "")
    if not files:
        raise HTError(f"no {what} at {text}: no .safetensors file in {where} {_where(text)}")
    names = ", ".join(f.relative_to(snapshot).as_posix() for f in files)
    raise HTError(f"{text}: {where} holds {len(files)} safetensors files ({names}); name one as {repo_id}/FILE "
                  f"(or weight_name=)")
