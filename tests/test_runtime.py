"""guard.load / Guard.classify: every accepted input form gives the logits of the
artifact's own model on its own preprocessing, batches equal single calls, and bad
inputs, backends and closed guards raise typed errors."""
import copy
import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import guard
from conftest import CLASSES, PROMPT_START_BLOCK, TINY_CFG
from guard._compat import import_open_clip
from guard.errors import ArtifactError, ClosedError, InputError
from guard.preprocess import Preprocess
from guard.prompted import PromptedCLIP, PromptedVisionEncoder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(tiny_artifact, prompts=True) -> PromptedCLIP:
    """The artifact's classifier assembled directly from the in-memory parts."""
    encoder = PromptedVisionEncoder(tiny_artifact.clip.visual)
    visual_prompts = None
    if prompts:
        visual_prompts = encoder.new_prompts(PROMPT_START_BLOCK, tiny_artifact.visual_prompts.shape[1])
        with torch.no_grad():
            visual_prompts.tokens.copy_(tiny_artifact.visual_prompts)
    return PromptedCLIP(encoder, tiny_artifact.text_features, tiny_artifact.logit_scale, visual_prompts).eval()


def reference_logits(classifier: PromptedCLIP, preprocess: Preprocess, images) -> torch.Tensor:
    """images: CHW tensors of any sizes, uint8 or float in [0, 1]."""
    with torch.no_grad():
        batch = torch.cat([preprocess(image.unsqueeze(0)) for image in images])
        return classifier(batch)[0]


def random_uint8(height, width, seed) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1)


# --- every input form ---------------------------------------------------------------------

def test_every_input_form_gives_the_reference_logits(model, tiny_artifact, tmp_path):
    array = random_uint8(40, 56, seed=1)
    png = tmp_path / "image.png"
    Image.fromarray(array).save(png)
    expected = reference_logits(reference(tiny_artifact), tiny_artifact.preprocess, [chw(array)])
    forms = {
        "PIL": Image.fromarray(array),
        "PIL RGBA": Image.fromarray(array).convert("RGBA"),
        "str path": str(png),
        "Path": png,
        "uint8 HxWx3": array,
        "float HxWx3": array.astype(np.float64) / 255,
        "float CHW tensor": chw(array).float() / 255,
        "uint8 CHW tensor": chw(array),
    }
    for name, item in forms.items():
        result = model.classify(item)
        assert isinstance(result, guard.Classification), name
        torch.testing.assert_close(model.logits(item), expected, atol=1e-5, rtol=0, msg=name)
        assert result.index == int(expected.argmax()) and result.label == CLASSES[result.index], name


def test_grayscale_inputs_are_repeated_to_three_channels(model, tiny_artifact):
    gray = random_uint8(36, 30, seed=2)[:, :, 0]
    expected = reference_logits(reference(tiny_artifact), tiny_artifact.preprocess,
                                [torch.from_numpy(gray).unsqueeze(0).expand(3, -1, -1)])
    colour = reference_logits(reference(tiny_artifact), tiny_artifact.preprocess, [chw(random_uint8(36, 30, 3))])
    assert not torch.allclose(expected, colour, atol=1e-3)  # the check below can tell images apart
    for item in (Image.fromarray(gray, mode="L"), gray, gray[:, :, None],
                 torch.from_numpy(gray).unsqueeze(0), torch.from_numpy(gray).unsqueeze(0).float() / 255):
        torch.testing.assert_close(model.logits(item), expected, atol=1e-5, rtol=0)


def test_exif_orientation_is_applied(model, tmp_path):
    array = random_uint8(24, 48, seed=4)
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(path))
    assert upright.size == (24, 48)
    torch.testing.assert_close(model.logits(path), model.logits(upright), atol=1e-6, rtol=0)
    assert not torch.allclose(model.logits(path), model.logits(array), atol=1e-3)


# --- results ------------------------------------------------------------------------------

def test_a_list_gives_the_single_results_in_order(model, tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(random_uint8(33, 33, seed=5)).save(png)
    items = [random_uint8(40, 56, seed=6), png, torch.rand(3, 64, 48),
             Image.fromarray(random_uint8(20, 70, seed=7)), str(png), torch.rand(1, 32, 32)]
    batched = model.classify(items)
    assert isinstance(batched, list) and len(batched) == len(items)
    assert isinstance(model.classify(tuple(items)), list)
    for item, result in zip(items, batched):
        single = model.classify(item)
        assert (result.index, result.label) == (single.index, single.label)
        np.testing.assert_allclose(result.probs, single.probs, atol=1e-5)
    assert len({result.probs for result in batched}) > 1  # distinct images, distinct results
    assert model.classify([]) == []


def test_lists_run_one_forward_per_batch(model):
    sizes = []
    hook = model._backend.model.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    try:
        items = [torch.rand(3, 32, 32) for _ in range(5)]
        chunked = model.logits(items, batch_size=2)
        assert sizes == [2, 2, 1]
        sizes.clear()
        whole = model.logits(items)
        assert sizes == [5]
    finally:
        hook.remove()
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="batch_size"):
        model.classify(items, batch_size=0)


def test_classification_is_frozen_and_serialisable(model):
    result = model.classify(torch.rand(3, 32, 32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.label = "other"
    assert sum(result.probs) == pytest.approx(1.0, abs=1e-5)
    assert len(result.probs) == len(CLASSES) and result.classes == CLASSES
    assert result.score == max(result.probs) == result.probs[result.index]
    assert result.top_k(2)[0] == (result.label, result.score)
    data = json.loads(json.dumps(result.to_dict()))
    assert data == {"label": result.label, "index": result.index, "probs": dict(zip(CLASSES, result.probs)),
                    "alert_score": result.alert_score, "threshold": None, "alert": None,
                    "alert_status": "uncalibrated"}


def test_probs_are_the_softmax_of_the_logits(model):
    image = torch.rand(3, 40, 40)
    expected = model.logits(image).softmax(dim=-1)[0]
    np.testing.assert_allclose(model.classify(image).probs, expected.numpy(), atol=1e-6)
    assert expected.max() > 0.3  # logit_scale 20 makes the classes distinguishable


# --- the artifact decides the model and the preprocessing ---------------------------------

def test_logits_match_prompted_clip_on_the_manifest_preprocessing(model, tiny_artifact, tmp_path):
    images = [torch.rand(3, 32, 32), torch.rand(3, 50, 41), (torch.rand(3, 20, 90) * 255).to(torch.uint8)]
    expected = reference_logits(reference(tiny_artifact), tiny_artifact.preprocess, images)
    torch.testing.assert_close(model.logits(images), expected, atol=1e-5, rtol=0)
    assert model.preprocess == tiny_artifact.preprocess

    other = Preprocess(32, (0.2, 0.3, 0.4), (0.5, 0.6, 0.7), interpolation="bilinear", resize_mode="squash")
    with guard.load(tiny_artifact.save(tmp_path / "other", preprocess=other), device="cpu") as changed:
        assert changed.preprocess == other
        logits = changed.logits(images)
    torch.testing.assert_close(logits, reference_logits(reference(tiny_artifact), other, images), atol=1e-5, rtol=0)
    assert not torch.allclose(logits, expected, atol=1e-3)


def test_the_visual_prompts_are_used(model, tiny_artifact, tmp_path):
    images = [torch.rand(3, 32, 32), torch.rand(3, 48, 40)]
    plain_path = tiny_artifact.save(tmp_path / "plain", visual_prompts=None, prompt_start_block=None)
    with guard.load(plain_path, device="cpu") as plain:
        without = plain.logits(images)
    expected = reference_logits(reference(tiny_artifact, prompts=False), tiny_artifact.preprocess, images)
    torch.testing.assert_close(without, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(without, model.logits(images), atol=1e-3)


@pytest.mark.parametrize("recorded_in", ["model_cfg", "base_model"])
def test_the_recorded_activation_is_used(tiny_artifact, tmp_path, recorded_in):
    open_clip = import_open_clip()
    quick_cfg = {**copy.deepcopy(TINY_CFG), "quick_gelu": True}
    quick = open_clip.model.CLIP(**quick_cfg).eval()
    quick.load_state_dict(tiny_artifact.clip.state_dict())
    if recorded_in == "base_model":  # older configs: only the base model identity knows
        del quick_cfg["quick_gelu"]
    base_model = {**tiny_artifact.base_model, "quick_gelu": True, "model_cfg": quick_cfg}
    images = [torch.rand(3, 32, 32), torch.rand(3, 40, 36)]
    with guard.load(tiny_artifact.save(tmp_path / "quick", base_model=base_model, visual_prompts=None,
                                       prompt_start_block=None), device="cpu") as loaded:
        logits = loaded.logits(images)
    quick_reference = PromptedCLIP(PromptedVisionEncoder(quick.visual), tiny_artifact.text_features,
                                   tiny_artifact.logit_scale)
    expected = reference_logits(quick_reference, tiny_artifact.preprocess, images)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    gelu = reference_logits(reference(tiny_artifact, prompts=False), tiny_artifact.preprocess, images)
    assert not torch.allclose(logits, gelu, atol=1e-4)


def test_the_loaded_model_is_frozen_and_in_eval_mode(model):
    classifier = model._backend.model
    assert not classifier.training and not any(module.training for module in classifier.modules())
    assert not any(parameter.requires_grad for parameter in classifier.parameters())
    assert classifier.num_folded_blocks == TINY_CFG["vision_cfg"]["layers"] - PROMPT_START_BLOCK
    assert model.classes == CLASSES and model.backend == "torch" and model.device == torch.device("cpu")
    assert model.manifest["classes"] == list(CLASSES)


def test_loading_leaves_the_random_stream_alone(tiny_artifact):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    guard.load(tiny_artifact.path, device="cpu").close()
    assert torch.equal(torch.rand(4), expected)


def test_weights_that_do_not_fit_the_config_are_an_artifact_error(tiny_artifact, tmp_path):
    state = dict(tiny_artifact.clip.visual.state_dict())
    state.pop("proj")
    with pytest.raises(ArtifactError, match="do not fit"):
        guard.load(tiny_artifact.save(tmp_path / "no-proj", vision_state=state))
    wrong_prompts = torch.zeros(3, 5, 64)  # 3 prompted blocks, but from block 1 on the tower has 2
    with pytest.raises(ArtifactError, match="visual prompts"):
        guard.load(tiny_artifact.save(tmp_path / "prompts", visual_prompts=wrong_prompts))


# --- bad inputs ---------------------------------------------------------------------------

def test_a_bad_item_in_a_list_is_named_by_its_index(model):
    good = torch.rand(3, 32, 32)
    with pytest.raises(InputError, match=r"input 1: 'nonexistent\.png': no such file"):
        model.classify([good, "nonexistent.png", good])
    with pytest.raises(InputError, match=r"input 4: .*NaN"):  # indices count across batches
        model.classify([good] * 4 + [torch.full((3, 8, 8), float("nan"))], batch_size=2)


@pytest.mark.parametrize("item, message", [
    (torch.full((3, 32, 32), float("nan")), "NaN or infinite"),
    (torch.tensor([[[0.5, float("inf")]]]), "NaN or infinite"),
    (torch.rand(1, 3, 32, 32), "CHW .* pass a batch as a list"),
    (torch.rand(32, 32, 3), "CHW with C = 1 or 3"),
    (torch.zeros(3, 0, 32), "empty"),
    (torch.randint(0, 255, (3, 8, 8), dtype=torch.int64), "uint8 .* or float"),
    (np.zeros((32, 32, 3), dtype=np.int32), "uint8 .* or float"),
    (np.zeros((32, 32, 3), dtype=bool), "uint8 .* or float"),
    (np.zeros((3, 32, 32), dtype=np.uint8), "HxW, HxWx1 or HxWx3"),
    (np.zeros((0, 5, 3), dtype=np.uint8), "empty"),
    (np.full((8, 8, 3), 255.0), r"\[0, 1\]"),
    ({"image": "x.png"}, "cannot read an image from a dict; expected a PIL image"),
    (b"\x89PNG", "cannot read an image from a bytes"),
    (None, "cannot read an image from a NoneType"),
])
def test_bad_inputs_are_input_errors(model, item, message):
    with pytest.raises(InputError, match=message):
        model.classify(item)


def test_unreadable_files_are_input_errors_naming_the_path(model, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    Image.fromarray(random_uint8(64, 64, seed=8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    for path in (text, truncated, tmp_path):
        with pytest.raises(InputError, match=path.name):
            model.classify(path)


def test_errors_are_value_errors_and_close_is_a_runtime_error():
    assert issubclass(InputError, ValueError)
    assert issubclass(ClosedError, RuntimeError) and issubclass(ClosedError, guard.ClipGuardError)


# --- load, backends, lifetime, threads ----------------------------------------------------

def test_unknown_backend_is_an_input_error_naming_the_supported_ones(tiny_artifact):
    with pytest.raises(InputError, match="'auto' or one of .*'torch'.*'onnxruntime'.*'nonsense'"):
        guard.load(tiny_artifact.path, backend="nonsense")
    with pytest.raises(InputError, match="not a torch device"):
        guard.load(tiny_artifact.path, device="no-such-device")
    loaded = guard.load(tiny_artifact.path, backend="torch")
    assert loaded.backend == "torch"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loaded.device.type == expected
    loaded.close()


def test_missing_artifacts_are_artifact_errors(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        guard.load(tmp_path)


def test_close_frees_the_model_and_later_calls_raise(tiny_artifact):
    with guard.load(tiny_artifact.path, device="cpu") as loaded:
        assert loaded.classify(torch.rand(3, 32, 32)).label in CLASSES
    assert loaded._backend is None
    for call in (lambda: loaded.classify(torch.rand(3, 32, 32)), lambda: loaded.logits([])):
        with pytest.raises(ClosedError, match="closed"):
            call()
    loaded.close()  # closing twice is harmless
    assert "closed" in repr(loaded)


def test_concurrent_classify_matches_serial(model):
    images = [torch.rand(3, 32 + 4 * i, 32) for i in range(8)]
    expected = [model.classify(image).probs for image in images]
    results, errors = {}, []

    def work(index):
        try:
            for _ in range(5):
                results[index] = model.classify(images[index]).probs
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for index, probs in enumerate(expected):
        np.testing.assert_allclose(results[index], probs, atol=1e-6)


def test_import_guard_stays_light():
    code = ("import sys, guard; heavy = [m for m in ('open_clip', 'safetensors', 'torchvision', 'timm') "
            "if m in sys.modules]; assert not heavy, heavy; assert callable(guard.load)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
