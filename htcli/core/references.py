"""Local paths or Hugging Face Hub references, resolved to local files through the Hub cache.

Everything that takes an intervention file or a hypernetwork takes either:

    runs/tiny/hyper                        a local folder or file (it wins when it exists)
    user/repo                              a Hub repo: its one file of the kind (or default name)
    user/repo/styles/art_deco.safetensors  a file in a Hub repo, by its path there
    user/repo@v1, user/repo@v1/a.safetensors  the same at a revision (a branch, tag or commit)

and, from Python, `weight_name=` / `subfolder=` as diffusers' `load_lora_weights` takes them, and
`revision=`, `token=`, `cache_dir=`, `local_files_only=`, `force_download=` as its
`from_pretrained` does (`HubOptions`). Downloads go through `huggingface_hub` and its cache
(`htcli.core.hub_access`), so `HF_HUB_OFFLINE=1` reads the cache only, an unreachable Hub falls
back to the cache, and whatever cannot be had is one line naming the reference. Names inside a repo are relative:
an absolute path or a `..` part is refused, so a Hub reference never reads another local file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import NoReturn

from htcli.core.hub_access import HubError, HubOptions, cached_snapshot, download, explain, offline, repo_files
from htcli.errors import HTError

SAFETENSORS = ".safetensors"


def split_reference(reference: str) -> tuple[str, str | None, str | None] | None:
    """("user/repo", "path/in/repo" or None, revision or None) if `reference` can name a Hub repo
    (`user/repo`, `user/repo@v1`, `user/repo@v1/dir/file.safetensors`), else None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    parts = reference.strip("/").split("/")
    if len(parts) < 2 or reference.startswith(("/", ".", "~")) or "\\" in reference:
        return None
    name, _, revision = parts[1].partition("@")
    repo_id = f"{parts[0]}/{name}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    if "@" in parts[1] and not revision:
        raise HTError(f"{reference}: nothing after '@'; write user/repo@REVISION (a branch, tag or commit)")
    return repo_id, "/".join(parts[2:]) or None, revision or None


def _relative(name: str | None, what: str) -> str | None:
    """`name` (a file or folder inside a repo or folder) if it is a plain relative path, else HTError."""
    if name is None:
        return None
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not str(path).strip("./"):
        raise HTError(f"{what} {name!r} must be a relative path inside the folder or repo, without '..'")
    return str(path)


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
                 subfolder: str | None = None, repo_type: str = "model", hub: HubOptions = HubOptions()) -> Path:
    """The local file a reference names (see the module docstring), downloading it into the Hub
    cache if need be.

    names: the file names to look for in a folder or repo, in order; none: the one safetensors
        file there. `weight_name` and `subfolder` choose the file explicitly.
    what: the kind of file, for error messages ("intervention file", "hypernetwork").
    hub: revision, token, cache folder... for a Hub repo (`htcli.core.hub_access`)."""
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
    repo_id, in_repo, revision = split
    hub = hub.with_revision(revision, text)
    in_repo = _relative(in_repo, f"{text}: the path in the repo")
    filename = weight_name
    if filename is None and in_repo and in_repo.endswith(SAFETENSORS):  # user/repo/dir/file.safetensors
        in_repo, _, filename = in_repo.rpartition("/")
    folder = "/".join(part for part in (subfolder, in_repo) if part) or None
    try:
        return _download(repo_id, folder, filename, names, repo_type, hub)
    except HubError:
        raise
    except HTError as error:
        raise HTError(f"no {what} at {text}: no such local file or folder, and {error}") from None


def _download(repo_id: str, folder: str | None, filename: str | None, names: Sequence[str], repo_type: str,
              hub: HubOptions) -> Path:
    """The file in the Hub repo, through the cache; HTError says why not (after "no such local ... and"),
    HubError when the Hub could not be read."""
    from huggingface_hub.errors import EntryNotFoundError

    where = f"Hub repo {repo_id}" + (f" folder {folder}" if folder else "")
    prefix = f"{folder}/" if folder else ""
    listed = repo_files(repo_id, repo_type, hub)  # None: from the cache
    candidates = [filename] if filename is not None else list(names)
    if not candidates:  # the one safetensors file there
        candidates = [_one_safetensors(repo_id, prefix, repo_type, hub, listed, where)]
    for name in candidates:
        if listed is not None and f"{prefix}{name}" not in listed:
            continue
        try:
            return download(repo_id, name, folder, repo_type, hub, from_cache=listed is None)
        except EntryNotFoundError:  # not in the cache
            continue
        except Exception as error:  # noqa: BLE001 - a failed download is one line too
            raise explain(error, repo_id, hub) from None
    where = f"{where} at revision {hub.revision!r}" if hub.revision else where
    return _missing(f"{' or '.join(candidates)} in {where}", listed)


def _missing(what: str, listed: list[str] | None) -> NoReturn:
    state = "on the Hub" if listed is not None else "in the Hub cache" + (
        " (HF_HUB_OFFLINE is set: the cache only)" if offline() else "")
    raise HTError(f"{what} not {state}")


def _one_safetensors(repo_id: str, prefix: str, repo_type: str, hub: HubOptions, listed: list[str] | None,
                     where: str) -> str:
    """The name (relative to the folder `prefix`) of the one safetensors file in the repo folder:
    from the Hub's listing (nothing is downloaded to choose), or the cached snapshot's files."""
    if listed is None:
        snapshot = cached_snapshot(repo_id, repo_type, hub, [f"{prefix}*{SAFETENSORS}"])
        if snapshot is None:
            _missing(f"{where} is", None)
        listed = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob(f"*{SAFETENSORS}")]
    files = sorted(f.removeprefix(prefix) for f in listed if f.startswith(prefix) and f.endswith(SAFETENSORS))
    if len(files) == 1:
        return files[0]
    if not files:
        raise HTError(f"no .safetensors file in {where}")
    raise HTError(f"{where} holds {len(files)} safetensors files ({', '.join(files)}); name one as "
                  f"{repo_id}/{prefix}FILE (or weight_name=)")
