"""Local paths or Hugging Face Hub references, resolved to local files through the Hub cache.

Everything that takes an intervention file or a hypernetwork takes either:

    runs/tiny/hyper                        a local folder or file (it wins when it exists)
    user/repo                              a Hub repo: its one file of the kind (or default name)
    user/repo/styles/art_deco.safetensors  a file in a Hub repo, by its path there

and, from Python, `weight_name=` / `subfolder=` as diffusers' `load_lora_weights` takes them.
Downloads go through `huggingface_hub` and its cache, so `HF_HUB_OFFLINE=1` reads the cache only;
whatever cannot be had is one line naming the reference. Names inside a repo are relative:
an absolute path or a `..` part is refused, so a Hub reference never reads another local file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from htcli.errors import HTError

SAFETENSORS = ".safetensors"


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    return (OSError, ValueError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError)


def _missing_file_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "no such file in the repo" (not: no access, no network)."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    return (EntryNotFoundError, LocalEntryNotFoundError)


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


def _relative(name: str | None, what: str) -> str | None:
    """`name` (a file or folder inside a repo or folder) if it is a plain relative path, else HTError."""
    if name is None:
        return None
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not str(path).strip("./"):
        raise HTError(f"{what} {name!r} must be a relative path inside the folder or repo, without '..'")
    return str(path)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _where() -> str:
    return "not in the Hub cache (HF_HUB_OFFLINE is set: the cache only)" if _offline() else "not on the Hub"


def _local(path: Path, names: Sequence[str], what: str) -> Path:
    """`path` if it is a file, else the first of `names` in the folder `path`; with no names, the
    folder's one safetensors file."""
    if path.is_file():
        return path
    found = [path / name for name in names if (path / name).is_file()]
    if found:
        return found[0]
    if not names:
        files = sorted(path.glob(f"*{SAFETENSORS}"))
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
    weight_name, subfolder = _relative(weight_name, "weight_name"), _relative(subfolder, "subfolder")
    local = Path(text).expanduser()
    if subfolder:
        local = local / subfolder
    if local.exists():
        return _local(local / weight_name if weight_name else local, names, what)
    split = split_reference(text)
    if split is None:
        raise HTError(f"no {what} at {text}: no such file or folder (and not a Hub repo id like user/repo)")
    repo_id, in_repo = split
    in_repo = _relative(in_repo, f"{text}: the path in the repo")
    filename = weight_name
    if filename is None and in_repo and in_repo.endswith(SAFETENSORS):  # user/repo/dir/file.safetensors
        in_repo, _, filename = in_repo.rpartition("/")
    folder = "/".join(part for part in (subfolder, in_repo) if part) or None
    try:
        return _download(repo_id, folder, filename, names, what, repo_type)
    except HTError as error:
        raise HTError(f"no {what} at {text}: no such local file or folder, and {error}") from None


def _download(repo_id: str, folder: str | None, filename: str | None, names: Sequence[str], what: str,
              repo_type: str) -> Path:
    """The file in the Hub repo, through the cache; HTError says why not (after "no such local ... and")."""
    from huggingface_hub import hf_hub_download

    where = f"Hub repo {repo_id}" + (f" folder {folder}" if folder else "")
    candidates = [filename] if filename is not None else list(names)
    try:
        if not candidates:  # the one safetensors file there
            candidates = [_one_safetensors(repo_id, folder, repo_type, where)]
        for name in candidates:
            try:
                return Path(hf_hub_download(repo_id, name, subfolder=folder, repo_type=repo_type))
            except _missing_file_errors():
                continue
    except HTError:
        raise
    except _hub_errors() as error:  # no access (private, gated), no network, no such repo
        raise HTError(f"{where} could not be read: {type(error).__name__}: {str(error).splitlines()[0][:200]}") from None
    raise HTError(f"{' or '.join(candidates)} in {where} {_where()}")


def _one_safetensors(repo_id: str, folder: str | None, repo_type: str, where: str) -> str:
    """The name (relative to `folder`) of the one safetensors file in the repo folder: listed on
    the Hub (nothing is downloaded to choose), or found in the cached snapshot when offline."""
    from huggingface_hub import list_repo_files, snapshot_download

    prefix = f"{folder}/" if folder else ""
    if _offline():
        try:
            snapshot = Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=[f"{prefix}*{SAFETENSORS}"]))
        except _missing_file_errors():
            raise HTError(f"{where} is {_where()}") from None
        files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob(f"*{SAFETENSORS}")]
    else:
        files = list_repo_files(repo_id, repo_type=repo_type)
    files = sorted(f.removeprefix(prefix) for f in files if f.startswith(prefix) and f.endswith(SAFETENSORS))
    if len(files) == 1:
        return files[0]
    if not files:
        raise HTError(f"no .safetensors file in {where} ({_where() if _offline() else 'it has none'})")
    raise HTError(f"{where} holds {len(files)} safetensors files ({', '.join(files)}); name one as "
                  f"{repo_id}/{prefix}FILE (or weight_name=)")
