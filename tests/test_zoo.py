"""training.zoo's scenes benchmark: the zoo starts from a pretrained scenes CLIP, poisons it
on web pairs the papers' way and records what the defenses are measured on."""
from __future__ import annotations

import json

import pytest
import torch

import training.poison
from guard._compat import import_open_clip
from guard.errors import InputError
from guard.hashing import sha256_file
from training import zoo
from training.models import load_clip, save_clip
from training.pretrain import PREPROCESS, PRETRAIN_JSON, RECIPE, pretrain, scenes_model_cfg
from training.pretrain import main as pretrain_main


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A scenes CLIP as training.pretrain writes it (random weights: nothing here needs it trained)."""
    torch.manual_seed(0)
    model = import_open_clip().model.CLIP(**scenes_model_cfg()).eval()
    return save_clip(model, scenes_model_cfg(), PREPROCESS, tmp_path_factory.mktemp("pretrained"))


@pytest.fixture()
def small_poisoning(monkeypatch):
    """The scenes recipe on 512 web pairs (2 steps of 256): the same code path, in seconds."""
    monkeypatch.setattr(training.poison, "WEB_PAIRS", 512)


def test_the_scenes_recipe_is_the_papers_way():
    assert zoo.SCENES_POISON.lr <= RECIPE.lr / 5  # at most a fifth of pretraining's peak
    assert zoo.SCENES_RATE <= 0.05
    assert zoo.SCENES_ATTACKS["badnet"]["params"]["position"] == "per-image"


def test_the_scenes_zoo_copies_the_pretrained_model_poisons_it_and_records_its_downstream(
        pretrained, small_poisoning, tmp_path):
    built = zoo.build_zoo(tmp_path / "zoo", data="scenes", attacks=("badnet",), pretrained=pretrained)
    clean, badnet = (json.loads((built[name] / zoo.ZOO_JSON).read_text()) for name in ("clean", "badnet"))
    assert sha256_file(built["clean"] / zoo.WEIGHTS) == sha256_file(pretrained / zoo.WEIGHTS)
    assert clean["downstream"] == badnet["downstream"] == "scenes"
    assert clean["recipe"]["pretrained_sha256"] == sha256_file(pretrained / zoo.WEIGHTS)
    assert badnet["recipe"]["trigger_params"]["position"] == "per-image"
    assert badnet["recipe"]["poison"]["lr"] == zoo.SCENES_POISON.lr
    trigger = json.loads((built["badnet"] / "trigger.json").read_text())
    assert trigger["poisoned_pairs"] == round(zoo.SCENES_RATE * 512)
    assert sha256_file(built["badnet"] / zoo.WEIGHTS) != sha256_file(pretrained / zoo.WEIGHTS)  # poisoning trained it
    assert badnet["metrics"]["asr"] is not None and 0.0 <= badnet["metrics"]["ca"] <= 100.0
    # cached: the same pretrained weights rebuild nothing
    stamps = {name: (path / zoo.WEIGHTS).stat().st_mtime_ns for name, path in built.items()}
    again = zoo.build_zoo(tmp_path / "zoo", data="scenes", attacks=("badnet",), pretrained=pretrained)
    assert {name: (path / zoo.WEIGHTS).stat().st_mtime_ns for name, path in again.items()} == stamps


def test_the_scenes_zoo_refuses_what_it_cannot_start_from(pretrained, tmp_path):
    # each refusal comes before anything is written
    with pytest.raises(InputError, match="pretrained scenes CLIP"):
        zoo.build_zoo(tmp_path / "zoo", data="scenes")
    with pytest.raises(InputError, match="scenes zoo only"):
        zoo.build_zoo(tmp_path / "zoo", data="digits", pretrained=pretrained)
    tiny = save_clip(import_open_clip().model.CLIP(**zoo.reference_model_cfg()), zoo.reference_model_cfg(),
                     zoo.PREPROCESS, tmp_path / "tiny")
    with pytest.raises(InputError, match="not a pretrained scenes CLIP"):
        zoo.build_zoo(tmp_path / "zoo", data="scenes", pretrained=tiny)
    with pytest.raises(InputError, match="is not a clipguard-scenes model"):  # a later stage continues the same model
        pretrain(tmp_path / "stage2", init=tiny)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            pretrain(tmp_path / "stage2", device="cuda")
    assert not (tmp_path / "stage2").exists()

    with pytest.raises(InputError, match="the digits zoo trains its own"):
        zoo._main(["--out", str(tmp_path / "zoo"), "--data", "digits", "--pretrain"])
    assert not (tmp_path / "zoo").exists()


def test_pretraining_writes_a_loadable_model_and_its_record(tmp_path, capsys):
    """Two steps of `python -m training.pretrain`: the model loads as a scenes CLIP, and
    pretrain.json records the recipe, the device, the weights' checksum and the gates."""
    out = tmp_path / "pretrained"
    assert pretrain_main(["--out", str(out), "--epochs", "0.005", "--device", "cpu", "--no-progress"]) == 0
    record = json.loads((out / PRETRAIN_JSON).read_text())
    assert record["device"] == "cpu" and record["training"]["epochs"] == 0.005
    assert record["weights_sha256"] == sha256_file(out / zoo.WEIGHTS)
    assert set(record["gates"]["pr"]) == {"noise_0.03", "blur_5", "color_jitter"}
    assert record["gates"]["zero_shot_ca"] < 80 and record["gates"]["failures"]  # two steps learn no classes
    assert "gates FAIL" in capsys.readouterr().out
    assert load_clip(str(out)).identity.model_cfg == scenes_model_cfg()
