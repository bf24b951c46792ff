"""Hub ids: the cache when offline (HF_HUB_OFFLINE=1 or no hub), with exactly what is missing and
how to get it; the network only when the user allows it or the hub endpoint answers."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest

from lmtune import hub, runtime
from lmtune.data.sources import DatasetAttr, open_source
from lmtune.errors import DataError, ModelError
from lmtune.models.load import load_model, load_tokenizer, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return server.getsockname()[1]


@pytest.fixture
def user_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(hub.AUTO_MARKER, raising=False)


@pytest.fixture
def auto_unreachable(monkeypatch):
    """lmtune's default (no HF_HUB_OFFLINE from the user) with a hub endpoint nothing answers on."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(hub.AUTO_MARKER, "1")
    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    return url


def cache_model(cache, repo_id, source_dir, names=None):
    """Lay `source_dir`'s files out as the HF cache holds a downloaded snapshot of `repo_id`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for path in Path(source_dir).iterdir():
        if names is None or path.name in names:
            shutil.copy(path, snapshot / path.name)
    return snapshot


def test_missing_model_offline_by_choice_names_the_id_and_the_download(hub_cache, user_offline):
    with pytest.raises(ModelError) as info:
        resolve_model("someone/tiny-model")
    assert "'someone/tiny-model' is not in the local HF cache" in info.value.message
    assert "HF_HUB_OFFLINE=1 keeps lmtune to the local cache" in info.value.message
    assert "`hf download someone/tiny-model`" in info.value.fix
    assert "HF_HUB_OFFLINE=0" in info.value.fix


def test_missing_model_with_the_hub_unreachable_says_so(hub_cache, auto_unreachable):
    with pytest.raises(ModelError) as info:
        resolve_model("someone/tiny-model")
    assert f"offline: the hub ({auto_unreachable}) cannot be reached" in info.value.message
    assert "`hf download someone/tiny-model`" in info.value.fix


@pytest.mark.parametrize("offline", ["user_offline", "auto_unreachable"])
def test_cached_hub_model_loads_offline(request, hub_cache, tiny_model_dir, offline):
    request.getfixturevalue(offline)
    snapshot = cache_model(hub_cache, "someone/tiny-model", tiny_model_dir)
    assert resolve_model("someone/tiny-model") == str(snapshot)
    model = load_model(resolve_model("someone/tiny-model"))
    tokenizer = load_tokenizer(resolve_model("someone/tiny-model"))
    assert model.config.num_hidden_layers == 2
    assert tokenizer("hello").input_ids


def test_partly_cached_model_names_what_is_missing(hub_cache, tiny_model_dir, user_offline):
    cache_model(hub_cache, "someone/tiny-model", tiny_model_dir, names={"config.json"})
    with pytest.raises(ModelError) as info:
        resolve_model("someone/tiny-model")
    assert "lacks *.safetensors weights" in info.value.message


def test_missing_hub_dataset_names_the_download(hub_cache, auto_unreachable, tmp_path):
    attr = DatasetAttr(name="hub", hf_hub_url="someone/some-data", info_file=str(tmp_path / "i.json"))
    with pytest.raises(DataError) as info:
        open_source(attr)
    assert "offline: the hub" in info.value.message
    assert "`hf download someone/some-data --repo-type dataset`" in info.value.fix


def test_online_decision(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(hub.AUTO_MARKER, "1")
    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT",
                            f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_online()  # lmtune's default and the hub answers: download
        monkeypatch.delenv(hub.AUTO_MARKER)
        assert not hub.hub_online()  # the user's HF_HUB_OFFLINE=1 wins even with a hub there
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        assert hub.hub_online()
        with hub.hub_access() as online:
            assert online and huggingface_hub.constants.HF_HUB_OFFLINE is False
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv(hub.AUTO_MARKER, "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub.hub_online()
    with hub.hub_access() as online:
        assert not online and huggingface_hub.constants.HF_HUB_OFFLINE is True


def test_configure_marks_offline_as_its_own_default_only_when_the_user_set_nothing(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(hub.AUTO_MARKER, raising=False)
    runtime.configure()
    assert (runtime.os.environ["HF_HUB_OFFLINE"], runtime.os.environ[hub.AUTO_MARKER]) == ("1", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv(hub.AUTO_MARKER)
    runtime.configure()
    assert runtime.os.environ["HF_HUB_OFFLINE"] == "0" and hub.AUTO_MARKER not in runtime.os.environ


def test_model_revision_picks_that_snapshot(hub_cache, tiny_model_dir, user_offline):
    from lmtune.config import build_config
    from lmtune.models.load import resolve_for

    main = cache_model(hub_cache, "someone/tiny-model", tiny_model_dir)
    tagged = main.parent / ("f" * 40)
    shutil.copytree(main, tagged)
    config = json.loads((tagged / "config.json").read_text())
    (tagged / "config.json").write_text(json.dumps({**config, "lmtune_tag": "v1"}))
    (main.parent.parent / "refs" / "v1").write_text("f" * 40)
    assert resolve_for(build_config({"model_name_or_path": "someone/tiny-model"})) == str(main)
    cfg = build_config({"model_name_or_path": "someone/tiny-model", "model_revision": "v1"})
    assert load_model(resolve_for(cfg)).config.lmtune_tag == "v1"
    # A trained run's own folder has no revision: the config's revision is not applied to it.
    assert resolve_for(cfg, tiny_model_dir) == tiny_model_dir
    cfg.model_revision = "v2"
    with pytest.raises(ModelError) as info:
        resolve_for(cfg)
    assert "'someone/tiny-model' at revision 'v2' is not in the local HF cache" in info.value.message
    assert "`hf download someone/tiny-model --revision v2`" in info.value.fix


def test_hub_adapter_id_loads_from_the_cache(hub_cache, tiny_model_dir, random_adapter, user_offline):
    import torch

    from lmtune.models.methods import load_adapters

    cache_model(hub_cache, "someone/tiny-adapter", random_adapter)
    ids = torch.tensor([[1, 2, 3, 4]])
    from_hub = load_adapters(load_model(tiny_model_dir), ["someone/tiny-adapter"], trainable_last=False)
    from_folder = load_adapters(load_model(tiny_model_dir), [random_adapter], trainable_last=False)
    plain = load_model(tiny_model_dir)
    with torch.no_grad():
        assert torch.equal(from_hub(ids).logits, from_folder(ids).logits)
        assert not torch.allclose(from_hub(ids).logits, plain(ids).logits)
    with pytest.raises(ModelError) as info:
        load_adapters(plain, ["someone/missing-adapter"], trainable_last=False)
    assert info.value.message.startswith("adapter_name_or_path: 'someone/missing-adapter' is not in "
                                         "the local HF cache (offline: HF_HUB_OFFLINE=1")
    assert "`hf download someone/missing-adapter`" in info.value.fix
