"""A hub id (`stable-diffusion-v1-5/stable-diffusion-v1-5`) as a local folder: found in the Hugging Face cache,
offline, nothing downloaded.

The cache layout (huggingface_hub's): `<cache>/models--<org>--<name>/refs/<branch or tag>` holds a commit hash and
`snapshots/<hash>/` the files of that commit. `<cache>` is, as in huggingface_hub, `$HF_HUB_CACHE`, else
`$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; the variables are read at
each call (huggingface_hub reads them once, at import). A name that is in no cache is an error listing every folder
looked in and how to bring the model here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# huggingface_hub's repo id: one or two names of letters, digits, "-", "_", "."; no "--" or ".." (validators.py)
REPO_ID_RE = re.compile(r"[\w.-]{1,96}(/[\w.-]{1,96})?")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def is_repo_id(name: str) -> bool:
    """Looks like a hub id (not a path): `org/name` or `name`, no "--", "..", leading "." or "/"."""
    return (REPO_ID_RE.fullmatch(name) is not None and "--" not in name and ".." not in name
            and not name.startswith((".", "-")) and not name.endswith((".", "-")))


def cache_dirs() -> list[tuple[Path, str]]:
    """(cache folder, where it came from) in huggingface_hub's order; the first one set wins there, we look in all."""
    env = os.environ
    found: list[tuple[Path, str]] = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # the second: huggingface_hub's older name
        if env.get(var):
            found.append((Path(env[var]).expanduser(), f"${var}"))
    if env.get("HF_HOME"):
        found.append((Path(env["HF_HOME"]).expanduser() / "hub", "$HF_HOME/hub"))
    xdg = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    found.append((xdg / "huggingface" / "hub", "the default" if not env.get("XDG_CACHE_HOME") else
                  "$XDG_CACHE_HOME/huggingface/hub"))
    unique: dict[Path, str] = {}
    for path, origin in found:
        unique.setdefault(path, origin)
    return list(unique.items())


def repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def snapshot(repo: Path, revision: str | None) -> Path | None:
    """The snapshot folder of `revision` (a branch or tag in refs/, or a commit hash; default main), or None."""
    revision = revision or "main"
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
    elif COMMIT_RE.fullmatch(revision):
        commit = revision
    else:
        return None
    folder = repo / "snapshots" / commit
    return folder if folder.is_dir() else None


def known_revisions(repo: Path) -> list[str]:
    refs = sorted(str(p.relative_to(repo / "refs")) for p in (repo / "refs").rglob("*") if p.is_file())
    folder = repo / "snapshots"
    snaps = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return refs + [s[:12] + "..." for s in snaps]


def resolve_repo(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of `repo_id` at `revision`, from the first cache that has it; else a
    FileNotFoundError naming every folder looked in (and the revisions a cached copy does have)."""
    looked, partial = [], []
    for cache, origin in cache_dirs():
        repo = repo_folder(cache, repo_id)
        if repo.is_dir():
            found = snapshot(repo, revision)
            if found is not None:
                return found
            partial.append(f"{repo} has revisions {', '.join(known_revisions(repo)) or 'none'}")
        looked.append(f"{repo} ({origin})")
    what = f"revision {revision!r} of " if revision else ""
    detail = f"; {'; '.join(partial)}" if partial else ""
    raise FileNotFoundError(
        f"{what}{repo_id}: not a local folder and not in the Hugging Face cache (looked in {', '.join(looked)}"
        f"{detail}). Nothing is downloaded here: fetch it on a machine with network (`huggingface-cli download "
        f"{repo_id}`) and copy its cache folder, point HF_HUB_CACHE or HF_HOME at the cache, or pass the model's "
        "local folder")


def weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)) \
        if folder.is_dir() else []


def variant_of(file_name: str) -> str | None:
    """`diffusion_pytorch_model.fp16.safetensors` -> "fp16"; `model.safetensors` -> None."""
    parts = re.sub(r"-\d{5}-of-\d{5}(?=\.)", "", file_name).split(".")  # shards: name[.variant]-00001-of-00002.ext
    return parts[-2] if len(parts) >= 3 else None


def check_variant(root: Path, subfolders: tuple[str, ...], variant: str | None) -> None:
    """Each weight sub-folder has files of `variant` (None: plain files); else one line naming the folder, what it
    has and the flag that fits (an fp16-only snapshot needs --variant fp16)."""
    for sub in subfolders:
        files = weight_files(root / sub)
        if not files:
            continue  # from_pretrained names what is missing
        variants = sorted({variant_of(f) or "" for f in files})
        if (variant or "") in variants:
            continue
        have = ", ".join(f"--variant {v}" if v else "no --variant" for v in variants)
        raise FileNotFoundError(
            f"{root / sub}: no {'plain' if not variant else repr(variant)} weight files (has {', '.join(files)}); "
            f"pass {have}")
