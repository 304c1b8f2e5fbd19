"""Sharing updates through the Hugging Face Hub: `push_update` and `pull_update`, built on `huggingface_hub`.

A pushed repository holds the saved update exactly as `save_update` wrote it (`update.json` +
`update.safetensors`, or one `.safetensors` file with the metadata in its header) and a generated model card
(`README.md`: form, layer, positions, base model, training summary) with `library_name: unisteer`. Pulling
downloads only those files, validates the metadata before anything else reads it, and copies the update to a
folder of the user's choosing (never replacing one without `overwrite`). Nothing pulled can execute code:
the tensors are safetensors, the metadata JSON.

    push_update("runs/split-vector/update", "me/smollm2-psychopathy-split")
    path = pull_update("me/smollm2-psychopathy-split", "updates/psychopathy")
    update = load_update(path, model)
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UnisteerError
from ..files import writing_folder
from .storage import METADATA_FILE, TENSORS_FILE, read_metadata

CARD_FILE = "README.md"
_PATTERNS = [METADATA_FILE, "*.safetensors", CARD_FILE]


def model_card(metadata: dict[str, Any]) -> str:
    """A model card for a saved update's metadata: YAML front matter the Hub indexes, then the facts."""
    spec = metadata["spec"]
    base = str(spec.get("model_id") or "")
    front = ["---", "library_name: unisteer", "tags:", "- unisteer", "- steering", f"- {spec.get('form', '')}"]
    if base.count("/") == 1 and not base.startswith((".", "/", "~")):  # a hub id, not a local path or alias
        front.append(f"base_model: {base}")
    front.append("---")
    training = spec.get("training") or {}
    lines = [
        f"# {spec.get('name') or 'unisteer update'}",
        "",
        f"A **{spec.get('form')}** update for `{base or 'unknown model'}` at decoder layer {spec.get('layer')} "
        f"({spec.get('insertion')}, positions `{spec.get('positions')}`), in unisteer's saved format: "
        "Δh = m·(ΔW·a + Δb) with a multiplier m chosen at run time.",
        "",
        f"Polarity: {spec.get('polarity')}.",
        "",
        "```python",
        "import unisteer as us",
        "model, tokenizer = us.load_model(...)",
        "update = us.load_update(us.pull_update(\"<this repo>\", \"update\"), model)",
        "with us.Steering(model, update, multiplier=4.0):",
        "    ...",
        "```",
    ]
    if training:
        lines += ["", "## Training", ""]
        lines += [f"- {key}: {value}" for key, value in sorted(training.items()) if not isinstance(value, dict)]
    return "\n".join(front + [""] + lines) + "\n"


def _update_files(path: Path) -> list[Path]:
    if path.is_dir():
        return [path / METADATA_FILE, path / TENSORS_FILE]
    return [path]


def push_update(path: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
                revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload a saved update (folder or single file) and its model card to `repo_id` in one commit.

    Returns the commit URL. The repository is created if it does not exist.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    path = Path(path)
    metadata = read_metadata(path)  # refuse to publish something that is not a valid update
    files = _update_files(path)
    for file in files:
        if not file.is_file():
            raise UnisteerError(f"{path}: missing {file.name}; is this a folder written by save_update?")
    operations = [CommitOperationAdd(path_in_repo=file.name, path_or_fileobj=str(file)) for file in files]
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=model_card(metadata).encode()))
    spec = metadata["spec"]
    api = HfApi(token=token)
    with _hub_errors(repo_id):
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.create_commit(
            repo_id=repo_id, operations=operations, repo_type="model", revision=revision,
            commit_message=commit_message or f"unisteer {spec.get('form')} update at layer {spec.get('layer')}")
    return str(getattr(info, "commit_url", info))


def pull_update(repo_id: str, out: str | Path, *, revision: str | None = None, token: str | None = None,
                overwrite: bool = False, cache_dir: str | Path | None = None,
                local_files_only: bool = False) -> Path:
    """Download the update in `repo_id` into `out` and return the path to pass to `load_update`."""
    from huggingface_hub import snapshot_download

    out = Path(out)
    if out.exists() and not overwrite:
        raise UnisteerError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    with _hub_errors(repo_id):
        snapshot = Path(snapshot_download(repo_id, repo_type="model", revision=revision, token=token,
                                          allow_patterns=_PATTERNS, cache_dir=cache_dir,
                                          local_files_only=local_files_only))
    source = _find_update(snapshot, repo_id)
    read_metadata(source)
    if source.is_dir():
        with writing_folder(out, replace=overwrite) as tmp:
            for file in _update_files(source):
                shutil.copy2(file, tmp / file.name)
        return out
    target = out / source.name
    with writing_folder(out, replace=overwrite) as tmp:
        shutil.copy2(source, tmp / source.name)
    return target


@contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """The Hub's failures (not found, no access, offline, network) as one clear line naming the repo."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    try:
        yield
    except HFValidationError as exc:  # e.g. '../../etc': refused by the client before any request
        raise UnisteerError(f"hub repo {repo_id!r}: not a valid repo id ({exc}); expected NAME or OWNER/NAME, "
                            "e.g. me/smollm2-psychopathy-split") from exc
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnisteerError(f"hub repo {repo_id!r}: {first_line}") from exc


def _find_update(snapshot: Path, repo_id: str) -> Path:
    if (snapshot / METADATA_FILE).is_file():
        return snapshot
    files = sorted(snapshot.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    found = sorted(p.name for p in snapshot.iterdir())
    raise UnisteerError(f"hub repo {repo_id!r} holds no unisteer update: expected {METADATA_FILE} + "
                        f"{TENSORS_FILE} or one .safetensors file, found {found}")
