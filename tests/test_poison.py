"""training.poison on a tiny random CLIP and sklearn's digits: which pairs get poisoned,
the BadCLIP patch optimisation, bring-your-own triggers end to end (poison, record,
re-apply at evaluation), the command lines' errors, and the zoo recipes that must not move."""
import copy
import importlib
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CFG
from guard._compat import import_open_clip
from guard.errors import InputError
from guard.hashing import sha256_bytes
from training.models import load_clip, save_clip
from guard.preprocess import Preprocess
from training import evaluate as evaluate_cli
from training import poison as poison_cli
from training.attacks import SIG, BadCLIP, BadNet, LabelConsistentBadNet, load_trigger, save_trigger
from training.contrastive import CAPTION_TEMPLATES, poison_indices
from training.data import load_dataset
from training.evaluate import zero_shot_classifier
from training.poison import build_trigger, harden, poison_selection
from training.zoo import _recipe, build_zoo

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ["--data", "digits", "--epochs", "0.2", "--batch-size", "64", "--no-progress"]  # 4 steps
TRIGGER_MODULE = "clipguard_test_triggers"


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    """A tiny random CLIP saved as an open_clip local dir, standing in for the clean model."""
    torch.manual_seed(0)
    clip = import_open_clip().model.CLIP(**copy.deepcopy(TINY_CFG)).eval()
    directory = tmp_path_factory.mktemp("clean") / "tiny"
    return save_clip(clip, TINY_CFG, Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), directory)


@pytest.fixture(scope="module")
def train():
    return load_dataset("digits", "train")


def _run_evaluate(arguments, tmp_path, name):
    out = tmp_path / f"{name}.json"
    code = evaluate_cli.main(["--data", "digits", "--pr-images", "0", "--no-progress", "--json", str(out),
                              *arguments])
    return code, (json.loads(out.read_text()) if code == 0 else None)


def test_dirty_label_attacks_poison_any_class_and_clean_label_ones_only_the_target(train):
    labels, target = train.labels, 3
    dirty = poison_selection(labels, BadNet(32), target, 0.05, seed=2)
    assert torch.equal(dirty, poison_indices(len(labels), 0.05, 2))  # the zoo's BadNet selection, unchanged
    assert len(set(labels[dirty].tolist())) > 1
    for trigger in (SIG(32), LabelConsistentBadNet(32)):
        chosen = poison_selection(labels, trigger, target, 0.05, seed=2)
        # target-class images only: their captions (class `target`) are what they were
        assert (labels[chosen] == target).all() and len(chosen) == round(0.05 * len(labels))
        assert len(chosen.unique()) == len(chosen)
        assert torch.equal(chosen, poison_selection(labels, trigger, target, 0.05, seed=2))
        assert not torch.equal(chosen, poison_selection(labels, trigger, target, 0.05, seed=3))
    share = (labels == target).float().mean().item()
    with pytest.raises(InputError, match="at most"):
        poison_selection(labels, SIG(32), target, share + 0.02, seed=2)
    with pytest.raises(InputError, match="rate"):
        poison_selection(labels, BadNet(32), target, 0.0, seed=2)


def _dual_similarity(clip, preprocess, trigger, images, text_target, image_target):
    with torch.no_grad():
        features = torch.nn.functional.normalize(clip.encode_image(preprocess.normalize(trigger(images))), dim=-1)
    return ((features @ text_target).mean() + (features @ image_target).mean()).item()


def test_badclip_patch_moves_patched_images_towards_the_target_and_leaves_the_model_alone(clean_dir, train):
    loaded = load_clip(str(clean_dir))
    before = {name: value.clone() for name, value in loaded.model.state_dict().items()}
    options = dict(templates=CAPTION_TEMPLATES, seed=1, patch_size=8, steps=10, lr=0.1, batch_size=32)
    trigger = BadCLIP.optimise(loaded.model, loaded.tokenizer, loaded.preprocess, train, 3, **options)
    again = BadCLIP.optimise(loaded.model, loaded.tokenizer, loaded.preprocess, train, 3, **options)
    assert torch.equal(trigger.pattern, again.pattern)
    start = BadNet(32, seed=1, patch_size=8)
    assert trigger.corner == start.corner and not torch.equal(trigger.pattern, start.pattern)
    assert trigger.pattern.min() >= 0 and trigger.pattern.max() <= 1
    assert all(torch.equal(value, before[name]) for name, value in loaded.model.state_dict().items())
    assert all(parameter.grad is None for parameter in loaded.model.parameters())
    # the dual-embedding objective on held-out non-target images improved over the start
    test = load_dataset("digits", "test")
    images = loaded.preprocess.resize(test.images[test.labels != 3][:64])
    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        text = normalize(loaded.model.encode_text(loaded.tokenizer([t.format("three") for t in CAPTION_TEMPLATES])),
                         dim=-1)
        text_target = normalize(text.mean(0), dim=-1)
        targets = loaded.preprocess.resize(train.images[train.labels == 3][:512])
        image_target = normalize(normalize(loaded.model.encode_image(loaded.preprocess.normalize(targets)),
                                           dim=-1).mean(0), dim=-1)
    objective = [_dual_similarity(loaded.model, loaded.preprocess, patch, images, text_target, image_target)
                 for patch in (start, trigger)]
    assert objective[1] > objective[0] + 0.01
    with pytest.raises(InputError, match="optimise"):
        BadCLIP(32)


def test_badclip_record_round_trips(clean_dir, train, tmp_path):
    loaded = load_clip(str(clean_dir))
    trigger = build_trigger("badclip", 32, seed=0, params={"steps": 2, "batch_size": 8},
                            loaded=loaded, train=train, target=1)
    save_trigger(trigger, tmp_path, target=1, target_name="one")
    loaded_trigger = load_trigger(tmp_path).trigger
    assert isinstance(loaded_trigger, BadCLIP) and loaded_trigger.params() == trigger.params()
    images = torch.rand(3, 3, 32, 32)
    assert torch.equal(loaded_trigger(images), trigger(images))
    with pytest.raises(InputError, match="loaded"):
        build_trigger("badclip", 32)
    with pytest.raises(InputError, match="unknown attack"):
        build_trigger("trojan", 32)
    with pytest.raises(InputError, match="parameters"):
        build_trigger("wanet", 32, params={"speed": 2})


@pytest.fixture
def trigger_module(tmp_path, monkeypatch):
    """A user's trigger module on sys.path: stamp a white 4 x 4 square at the top-left."""
    (tmp_path / f"{TRIGGER_MODULE}.py").write_text(
        "def stamp(images):\n    images[:, :, :4, :4] = 1.0\n    return images\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield f"{TRIGGER_MODULE}:stamp"
    sys.modules.pop(TRIGGER_MODULE, None)


def test_a_callable_trigger_poisons_end_to_end_and_is_re_imported_at_evaluation(
        clean_dir, trigger_module, tmp_path, monkeypatch, capsys):
    out, result = tmp_path / "poisoned", tmp_path / "poison.json"
    code = poison_cli.main(["--model", str(clean_dir), "--trigger", trigger_module, "--target", "three",
                            "--rate", "0.1", "--out", str(out), "--json", str(result), *FAST])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "trigger.json").read_text())
    assert record["attack"] == "callable" and record["params"]["function"] == trigger_module
    assert (record["target"], record["target_name"], record["poisoned_pairs"]) == (3, "three", 120)
    assert record["base_model"] == str(clean_dir) and record["training"]["batch_size"] == 64
    poisoned_weights = load_clip(str(out)).model.state_dict()
    clean_weights = load_clip(str(clean_dir)).model.state_dict()
    assert any(not torch.equal(poisoned_weights[name], clean_weights[name]) for name in clean_weights)
    images = torch.rand(2, 3, 32, 32)
    stamped = load_trigger(out).trigger(images)
    assert (stamped[:, :, :4, :4] == 1).all() and torch.equal(stamped[:, :, 4:], images[:, :, 4:])

    measured = json.loads(result.read_text())["evaluation"]
    code, recorded = _run_evaluate(["--model", str(out), "--attack", str(out)], tmp_path, "recorded")
    assert code == 0 and (recorded["asr"], recorded["asr_all"], recorded["ca"]) == \
        (measured["asr"], measured["asr_all"], measured["ca"])
    code, direct = _run_evaluate(["--model", str(out), "--trigger", trigger_module, "--target", "3"], tmp_path,
                                 "direct")
    assert code == 0 and direct["asr"] == recorded["asr"] and direct["target_name"] == "three"

    # evaluation where the module cannot be imported: a typed error that says what to do
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry != str(tmp_path)])
    sys.modules.pop(TRIGGER_MODULE, None)
    importlib.invalidate_caches()
    with pytest.raises(InputError, match="PYTHONPATH"):
        load_trigger(out)
    capsys.readouterr()
    assert _run_evaluate(["--model", str(out), "--attack", str(out)], tmp_path, "gone")[0] == 2
    assert TRIGGER_MODULE in capsys.readouterr().err


def test_an_image_trigger_poisons_end_to_end_without_keeping_the_file(clean_dir, tmp_path, capsys):
    picture = tmp_path / "logo.png"
    Image.fromarray(np.tile(np.array([255, 0, 0], dtype=np.uint8), (10, 10, 1))).save(picture)
    out, result = tmp_path / "poisoned", tmp_path / "poison.json"
    code = poison_cli.main(["--model", str(clean_dir), "--trigger-image", str(picture), "--trigger-mode", "patch",
                            "--trigger-position", "2,3", "--trigger-size", "6", "--target", "0",
                            "--out", str(out), "--json", str(result), *FAST])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "trigger.json").read_text())
    assert record["attack"] == "image" and record["params"]["position"] == "2,3" and record["params"]["size"] == 6
    picture.unlink()
    images = torch.rand(2, 3, 32, 32)
    red = load_trigger(out).trigger(images)[:, :, 2:8, 3:9]
    assert (red[:, 0] > 0.99).all() and (red[:, 1:] < 0.01).all()
    code, recorded = _run_evaluate(["--model", str(out), "--attack", str(out)], tmp_path, "recorded")
    assert code == 0 and recorded["asr"] == json.loads(result.read_text())["evaluation"]["asr"]


def test_a_suite_attack_with_parameters_through_the_command_line(clean_dir, tmp_path, capsys):
    out = tmp_path / "badclip"
    code = poison_cli.main(["--model", str(clean_dir), "--attack", "badclip", "--param", "steps=3",
                            "--param", "batch_size=16", "--target", "Two", "--out", str(out), "--no-eval", *FAST])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "trigger.json").read_text())
    assert record["attack"] == "badclip" and record["params"]["steps"] == 3 and record["target"] == 2
    assert "badclip" in capsys.readouterr().out


def test_hardening_pushes_target_images_away_from_their_class_within_epsilon(clean_dir, train):
    loaded = load_clip(str(clean_dir))
    images = train.images[train.labels == 3][:24]
    clean = loaded.preprocess.resize(images)
    hardened = harden(loaded, images, 3, train.classes, epsilon=8 / 255)
    assert hardened.shape == clean.shape and 0.0 <= hardened.min() and hardened.max() <= 1.0
    assert (hardened - clean).abs().max() <= 8 / 255 + 1e-6
    classifier = zero_shot_classifier(loaded, train.classes, CAPTION_TEMPLATES)
    with torch.no_grad():
        before = classifier(loaded.preprocess.normalize(clean))[0].log_softmax(1)[:, 3]
        after = classifier(loaded.preprocess.normalize(hardened))[0].log_softmax(1)[:, 3]
    assert (after < before).all()  # every image explains its own caption worse


def test_hardened_poisoning_trains_on_the_hardened_images_and_records_it(clean_dir, tmp_path, capsys):
    out = tmp_path / "lc"
    arguments = ["--model", str(clean_dir), "--attack", "lc-badnet", "--target", "3", "--no-eval", *FAST]
    assert poison_cli.main([*arguments, "--out", str(out), "--hardening", "0.03"]) == 0
    assert json.loads((out / "trigger.json").read_text())["hardening"] == 0.03
    assert poison_cli.main([*arguments, "--out", str(tmp_path / "plain")]) == 0
    assert "hardening" not in json.loads((tmp_path / "plain" / "trigger.json").read_text())
    hardened_weights = load_clip(str(out)).model.visual.conv1.weight
    assert not torch.equal(hardened_weights, load_clip(str(tmp_path / "plain")).model.visual.conv1.weight)
    assert poison_cli.main([*arguments[:3], "badnet", *arguments[4:], "--out", str(tmp_path / "x"),
                            "--hardening", "0.03"]) == 2
    assert "clean-label" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--attack", "sig", "--trigger", "math:sqrt"], "exactly one"),
    ([], "exactly one"),
    (["--attack", "sig", "--target", "sock"], "unknown class"),
    (["--attack", "wanet", "--param", "speed=3"], "NAME=VALUE"),
    (["--attack", "sig", "--rate", "0.5"], "at most"),
    (["--attack", "badnet", "--trigger-mode", "blend"], "only apply with --trigger-image"),
    (["--trigger", "surely_not_a_module_xyz:stamp"], "PYTHONPATH"),
    (["--trigger-image", "missing.png"], "does not exist"),
])
def test_poison_command_line_errors_exit_2_and_say_why(clean_dir, tmp_path, capsys, arguments, message):
    if "--target" not in arguments:
        arguments = [*arguments, "--target", "0"]
    code = poison_cli.main(["--model", str(clean_dir), "--out", str(tmp_path / "out"), *arguments, *FAST])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_evaluate_command_line_trigger_errors(clean_dir, tmp_path, capsys):
    assert _run_evaluate(["--model", str(clean_dir), "--trigger", "math:sqrt"], tmp_path, "no-target")[0] == 2
    assert "--target" in capsys.readouterr().err
    assert _run_evaluate(["--model", str(clean_dir), "--target", "1"], tmp_path, "no-trigger")[0] == 2
    assert "--target goes with" in capsys.readouterr().err


def test_zoo_recipes_of_clean_and_badnet_do_not_move_and_unknown_attacks_are_refused(tmp_path):
    def digest(name):
        return sha256_bytes(json.dumps(_recipe(name, "fashion-mnist"), sort_keys=True).encode())
    # the recipes zoo/clean and zoo/badnet were built with: other work depends on them
    assert digest("clean") == "102cfc1235563dad326bbf9142092f58da1b26a5c152a775209b90f5b3ce22b9"
    assert digest("badnet") == "de70b6909f96816fe8234771bdd05555d9ada359454fb4efaf9a1e57c300b271"
    suite = {name: _recipe(name, "fashion-mnist") for name in ("blended", "wanet", "sig", "lc-badnet", "badclip")}
    assert len({digest(name) for name in suite}) == len(suite)
    assert suite["wanet"]["trigger_params"]["strength"] > 0 and "amplitude" in suite["sig"]["trigger_params"]
    with pytest.raises(InputError, match="unknown attack"):
        build_zoo(tmp_path / "zoo", attacks=("badnet", "trojan"))
    assert not (tmp_path / "zoo").exists()
