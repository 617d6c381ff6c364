"""The defense registry, presets and settings: a defense added by one entry runs through
purify, its command line and the report; every preset of the docs is valid; settings are
typed and belong to one method."""
import copy
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import guard
from conftest import TINY_CFG
from guard._compat import import_open_clip
from guard.errors import InputError
from guard.preprocess import Preprocess
from training import defenses
from training import purify as purify_cli
from training import report as report_cli
from training.attacks import BadNet
from training.baselines import embed_images
from training.configs import parse_assignments
from training.contrastive import ContrastiveConfig
from training.defenses.presets import PRESETS, check_presets, default_method
from training.models import save_clip
from training.poison import poison
from training.purify import purify
from training.report import RESULT_JSON

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class ClassMeanSettings:
    blend: float = 1.0  # 1: the class means alone, 0: the template embeddings alone


def train_class_means(context: defenses.TrainContext, settings: ClassMeanSettings) -> defenses.Trained:
    """Nearest class mean: each class embedding is the mean of its shots' normalised image
    embeddings, blended with the template's. Trains nothing, changes the classifier."""
    embeddings = F.normalize(embed_images(context.encoder, context.preprocess, context.shots.images,
                                          context.text_features.device), dim=-1)
    means = torch.stack([embeddings[context.shots.labels == label].mean(0) for label in range(len(context.classes))])
    features = (settings.blend * F.normalize(means, dim=-1)
                + (1 - settings.blend) * F.normalize(context.text_features.float(), dim=-1))
    return defenses.Trained(features, context.logit_scale, recorded={"class_means": {"blend": settings.blend}})


TOY = defenses.Defense("class-means", "nearest class mean of the shots (a test defense)", ClassMeanSettings,
                       train_class_means, stages={"toy": ""}, help={"blend": "weight of the class means"},
                       in_report=False)


@pytest.fixture
def toy():
    defenses.register(TOY)  # the one entry
    yield TOY
    defenses.unregister(TOY.name)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """ZOO/clean (a tiny random CLIP) and ZOO/badnet (it, poisoned for a few steps)."""
    torch.manual_seed(0)
    clip = import_open_clip().model.CLIP(**copy.deepcopy(TINY_CFG)).eval()
    root = tmp_path_factory.mktemp("zoo")
    clean = save_clip(clip, TINY_CFG, Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), root / "clean")
    poison(str(clean), "digits", BadNet(32), 0, root / "badnet", rate=0.1,
           config=ContrastiveConfig(epochs=0.2, batch_size=64), run_evaluation=False)
    return root


def test_a_registered_defense_runs_through_purify_and_serves_what_it_trained(toy, zoo, tmp_path):
    model = str(zoo / "badnet")
    result = purify(model, "digits", tmp_path / "toy", method="class-means", shots=4, pr_images=0, test_limit=80)
    none = purify(model, "digits", tmp_path / "none", method="none", shots=4, pr_images=0, test_limit=80)
    artifact = guard.load(result.out, device="cpu")
    assert artifact.manifest["method"]["name"] == "class-means"
    assert artifact.manifest["method"]["hyperparameters"] == {"class_means": {"blend": 1.0}, "shots": 4,
                                                             "data": "digits"}
    assert artifact.manifest["visual_prompts"] is None
    assert result.fr_cosine is None and artifact.manifest["metrics"]["fr_cosine"] is None  # no prompts to repel
    # the class means of a random tower are not the template embeddings: the defense changed the model
    assert not torch.allclose(result.classifier.text_features, none.classifier.text_features, atol=1e-3)
    assert result.after != result.before and none.after == none.before
    artifact.close()
    # blend 0 is the template embeddings again: the same figures as no defense
    zero = purify(model, "digits", tmp_path / "zero", method="class-means", settings={"blend": 0}, shots=4,
                  pr_images=0, test_limit=80)
    assert zero.after.ca == pytest.approx(none.after.ca) and zero.after.asr == pytest.approx(none.after.asr)


def test_a_registered_defense_has_its_command_line_help_and_settings_checks(toy, zoo, tmp_path, capsys):
    assert "class-means" in purify_cli.build_parser().description
    assert purify_cli.main(["--help-method", "class-means"]) == 0
    assert "blend  float [1]  weight of the class means" in capsys.readouterr().out
    out, metrics = tmp_path / "toy", tmp_path / "toy.json"
    assert purify_cli.main(["--method", "class-means", "--model", str(zoo / "badnet"), "--data", "digits", "--shots",
                            "4", "--out", str(out), "--set", "blend=0.5", "--set", "pr_images=0", "--set",
                            "test_limit=50", "--json", str(metrics), "--no-progress"]) == 0
    assert json.loads((out / "manifest.json").read_text())["method"]["hyperparameters"]["class_means"] == {
        "blend": 0.5}
    assert json.loads(metrics.read_text())["after"]["num_images"] == 50
    assert purify_cli.main(["--method", "class-means", "--model", str(zoo / "badnet"), "--out", str(out),
                            "--set", "epochs=3"]) == 2
    assert "'epochs' is not a setting of class-means" in capsys.readouterr().err


def test_a_registered_defense_is_a_row_of_the_report(toy, zoo, tmp_path):
    out = tmp_path / "report"
    assert report_cli.main(["--zoo", str(zoo), "--out", str(out), "--data", "digits", "--shots", "4",
                            "--defenses", "none,class-means", "--test-limit", "60", "--pr-images", "0",
                            "--no-detection", "--set", "toy.blend=0.5", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["rows"] == ["none", "class-means"]
    recorded = json.loads((out / "runs" / "badnet" / "class-means" / RESULT_JSON).read_text())
    assert recorded["settings"]["arguments"]["settings"] == {"blend": 0.5}
    cell = report["summary"]["table"]["class-means"]["badnet"]
    assert (cell["ca"], cell["asr"]) == (recorded["after"]["ca"], recorded["after"]["asr"])
    assert "| class-means |" in (out / "report.md").read_text()
    assert "class-means" not in defenses.names("report")  # in_report=False: named, not a default row


def test_unregistering_removes_the_method(toy):
    defenses.unregister(toy.name)
    with pytest.raises(InputError, match="unknown method 'class-means'"):
        defenses.get("class-means")
    defenses.register(toy)  # for the fixture's own unregister
    with pytest.raises(InputError, match="registered already"):
        defenses.register(toy)


# --------------------------------------------------------------------------- presets, --set, config files


def test_every_preset_is_a_registered_method_with_its_own_settings():
    check_presets()
    assert default_method() == PRESETS["default"].method == "rvpt"
    assert dict(PRESETS["rvpt-strong"].settings) == {"lr": 0.5, "alpha": 8.0, "epochs": 100, "num_tokens": 32}


def test_help_lists_at_most_15_options(capsys):
    with pytest.raises(SystemExit):
        purify_cli.build_parser().parse_args(["--help"])
    options = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  -")]
    assert len(options) <= 15


@pytest.mark.parametrize("suffix, text", [
    (".toml", 'preset = "unlearn-frozen"\n[settings]\ndistill_mixup = 4\ntest_limit = 2000\n'),
    (".json", '{"preset": "unlearn-frozen", "settings": {"distill_mixup": 4, "test_limit": 2000}}'),
])
def test_a_config_file_gives_a_preset_and_settings_and_set_wins(tmp_path, suffix, text):
    path = tmp_path / f"recipe{suffix}"
    path.write_text(text)
    method, settings, run = purify_cli.resolve(None, None, path, ["lr=0.05"])
    assert method == "unlearn" and run.test_limit == 2000
    assert (settings.distill_mixup, settings.lr, settings.unlearn_targets, settings.alpha) == (4.0, 0.05, "frozen",
                                                                                                0.0)


@pytest.mark.parametrize("text, assignments, message", [
    ('{"method": "cbpt", "settings": {"lr": "fast"}}', [], "cbpt setting 'lr' must be float"),
    ('{"method": "cbpt", "speed": 2}', [], "unknown keys \\['speed'\\]"),
    ('{"preset": "rvpt-strong", "method": "cbpt"}', [], "preset rvpt-strong is a recipe of method rvpt"),
    ('{"method": "rvpt+cbpt", "settings": {"rvpt": {"epochs": 2}, "cbpt": {"alpha": 1}}}', [],
     "'alpha' is not a setting of rvpt\\+cbpt's cbpt"),
    ('{"method": "rvpt"}', ["test_limit=many"], "the run setting 'test_limit' must be int or null"),
    ('{"preset": "nope"}', [], "unknown preset 'nope'"),
    ('[1, 2]', [], "must hold a table"),
    ('{"method": ', [], "not valid JSON"),
])
def test_bad_config_files_and_settings_are_input_errors(tmp_path, text, assignments, message):
    path = tmp_path / "recipe.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        purify_cli.resolve(None, None, path, assignments)


def test_purify_and_the_report_parse_set_alike():
    items = ["lr=0.5", "position=end", "templates=[\"a {}\"]", "quick_gelu=true", "init_std=null"]
    assert parse_assignments(items) == {"lr": 0.5, "position": "end", "templates": ["a {}"], "quick_gelu": True,
                                        "init_std": None}
    stages = dict(report_cli.parse_settings([f"rvpt.{item}" for item in items]))
    assert dict(stages["rvpt"]) == parse_assignments(items)
