"""push_update / pull_update, offline: the Hub's commit endpoint is replaced by a fake that writes what it is
sent into a local Hugging Face cache (the layout `snapshot_download` reads), and pulling goes through the real
`snapshot_download(local_files_only=True)`. So the operations we build and the files we read back are real
huggingface_hub objects; only the network is not."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import huggingface_hub
import pytest
import torch

from tiny_models import tiny_model
from unisteer.cli import main
from unisteer.engine.hub import pull_update, push_update
from unisteer.engine.storage import load_update, save_update
from unisteer.engine.updates import create_update
from unisteer.errors import UnisteerError

REPO = "someone/tiny-steer"


class FakeHub:
    """Stands in for the Hub's create_repo / create_commit, writing commits into a local cache folder."""

    def __init__(self, cache: Path):
        self.cache, self.commits, self.repos = cache, [], []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, api, *, repo_id, operations, commit_message, revision=None, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            if isinstance(source, (str, Path)):
                data = Path(source).read_bytes()
            elif isinstance(source, bytes):
                data = source
            else:
                data = source.read()
            files[op.path_in_repo] = data
        sha = hashlib.sha1(b"".join(files[k] for k in sorted(files))).hexdigest()
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / sha
        snapshot.mkdir(parents=True)
        for name, data in files.items():
            (snapshot / name).write_bytes(data)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / (revision or "main")).write_text(sha)
        self.commits.append((repo_id, sorted(files), commit_message))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{sha}",
                                          commit_message=commit_message, commit_description="", oid=sha)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hf-cache")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(
        api, repo_id, **kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda api, **kw: fake.create_commit(api, **kw))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network
    return fake


def saved(tmp_path, form="lora", single_file=False):
    model = tiny_model("llama")
    update = create_update(model, form, 1, rank=2, name="tiny")
    with torch.no_grad():
        for p in update.parameters():
            p.normal_()
    target = tmp_path / ("update.safetensors" if single_file else "update")
    return model, update, save_update(update, target)


@pytest.mark.parametrize("single_file", [False, True])
def test_push_then_pull_gives_back_the_same_update(tmp_path, hub, single_file):
    model, update, path = saved(tmp_path, single_file=single_file)
    url = push_update(path, REPO, private=True)
    assert url.startswith(f"https://huggingface.co/{REPO}/commit/")
    (repo_id, files, message), = hub.commits
    assert repo_id == REPO and "README.md" in files and "lora" in message
    assert hub.repos == [(REPO, {"repo_type": "model", "private": True, "exist_ok": True})]
    pulled = pull_update(REPO, tmp_path / "pulled", cache_dir=hub.cache, local_files_only=True)
    back = load_update(pulled, model)
    for a, b in zip(update.parameters(), back.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert back.spec == update.spec


def test_the_model_card_names_the_update(tmp_path, hub):
    _, _, path = saved(tmp_path, form="vector")
    push_update(path, REPO)
    card = next((hub.cache / f"models--{REPO.replace('/', '--')}" / "snapshots").iterdir()) / "README.md"
    text = card.read_text()
    assert text.startswith("---\nlibrary_name: unisteer\n") and "**vector** update" in text and "layer 1" in text


def test_push_refuses_what_is_not_an_update(tmp_path, hub):
    (tmp_path / "junk").mkdir()
    with pytest.raises(UnisteerError, match="not an update folder"):
        push_update(tmp_path / "junk", REPO)
    assert hub.commits == []


def test_pull_never_replaces_a_folder_and_refuses_repos_without_an_update(tmp_path, hub):
    _, _, path = saved(tmp_path)
    push_update(path, REPO)
    (tmp_path / "taken").mkdir()
    with pytest.raises(UnisteerError, match="already exists"):
        pull_update(REPO, tmp_path / "taken", cache_dir=hub.cache, local_files_only=True)
    hub.create_commit(None, repo_id="someone/empty", commit_message="x",
                      operations=[huggingface_hub.CommitOperationAdd("notes.txt", io.BytesIO(b"hi"))])
    with pytest.raises(UnisteerError, match="holds no unisteer update"):
        pull_update("someone/empty", tmp_path / "e", cache_dir=hub.cache, local_files_only=True)


def test_push_and_pull_commands(tmp_path, hub, capsys):
    _, _, path = saved(tmp_path)
    assert main(["push", str(path), REPO]) == 0
    assert "commit" in capsys.readouterr().out
    pull = ["pull", REPO, str(tmp_path / "pulled"), "--cache-dir", str(hub.cache)]
    assert main(pull) == 0
    assert (tmp_path / "pulled" / "update.json").is_file()
    assert main(pull) == 2  # exists: refused, one error line
    assert "already exists" in capsys.readouterr().err
