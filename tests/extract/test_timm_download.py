"""timm:<model> with --weights imagenet takes timm's cached file, else lets timm download it into its
own cache when the machine is online; offline ($HF_HUB_OFFLINE, `msdn extract --offline`) or with the
hub out of reach it refuses in one line. The tests never reach the hub: the download is pointed at a
closed local port."""
import hashlib

import pytest
import timm
from click.testing import CliRunner

import cli
from extract.backbone_weights import BackboneWeightsError
from extract.backbones import BackboneSpec, describe

MODEL = "resnet10t"
SPEC = BackboneSpec(f"timm:{MODEL}", 64, "imagenet")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Empty caches, downloads allowed, the hub at a port where nothing listens."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # also restores the variable that --offline sets
    return tmp_path / "hf_cache"


def refusal(spec=SPEC) -> str:
    with pytest.raises(BackboneWeightsError) as err:
        describe(spec)
    assert "\n" not in str(err.value) and f"'{MODEL}'" in str(err.value) and "--weights FILE" in str(err.value)
    return str(err.value)


def test_offline_is_refused_in_one_line(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "downloads are off ($HF_HUB_OFFLINE or --offline)" in refusal()


def test_online_tries_timms_download_and_says_why_it_failed(hub):
    assert "download failed: cannot reach 127.0.0.1:9" in refusal()


def test_the_cli_offline_switch(hub, tmp_path):
    result = CliRunner().invoke(cli.main, ["extract", "--dataset", "demo", "--data-root", str(tmp_path / "demo"),
                                           "--backbone", SPEC.name, "--offline", "--out", str(tmp_path / "x.h5")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "downloads are off" in lines[0] and "Traceback" not in result.output


def test_a_cached_file_is_used_and_hashed_without_a_download(hub):
    repo = timm.models.get_pretrained_cfg(MODEL).hf_hub_id
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / "0123abc").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abc")
    from safetensors.torch import save_file
    file = folder / "snapshots" / "0123abc" / "model.safetensors"
    save_file(timm.create_model(MODEL).state_dict(), str(file))
    info = describe(SPEC)  # a download would fail (nothing listens): the cache hit needs none
    assert info["weights_file"] == str(file.resolve()) and info["weights_source"] == "timm local cache"
    assert info["weights_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
