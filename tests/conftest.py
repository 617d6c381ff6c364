"""Shared fixtures: the tiny purified-model artifact, and the reference zoo built once per session."""
from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from guard._compat import import_open_clip
from guard.artifact import save_artifact
from guard.preprocess import Preprocess
from guard.prompted import PromptedVisionEncoder

TINY_CFG = {
    "embed_dim": 32,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
CLASSES = ("airplane", "bird", "cat", "truck")
PROMPT_START_BLOCK = 1
PROMPT_TOKENS = 5


@dataclass
class TinyArtifact:
    """A saved artifact (path) and the in-memory parts it was written from."""
    path: Path
    clip: torch.nn.Module
    visual_prompts: torch.Tensor  # [blocks from PROMPT_START_BLOCK on, PROMPT_TOKENS, width]
    text_features: torch.Tensor
    logit_scale: float
    preprocess: Preprocess
    base_model: dict

    def save(self, out_dir, **overrides) -> Path:
        """Write these parts (any save_artifact argument replaced by `overrides`) to out_dir."""
        arguments = dict(
            base_model=self.base_model, vision_state=self.clip.visual.state_dict(),
            visual_prompts=self.visual_prompts, prompt_start_block=PROMPT_START_BLOCK,
            text_features=self.text_features, logit_scale=self.logit_scale, classes=CLASSES,
            templates=["a photo of a {}."], preprocess=self.preprocess, method="rvpt",
            hyperparameters={"epochs": 2, "lr": 0.01}, metrics={"clean_accuracy": 0.75, "asr": 0.05})
        arguments.update(overrides)
        return save_artifact(out_dir, **arguments)


def smooth_images(count: int, seed: int = 0, side: int = 32, blur: int = 5) -> torch.Tensor:
    """Seeded uniform noise box-blurred over blur x blur pixels: images [count, 3, side, side]
    in [0, 1] with some local structure, for calibration tests."""
    pixels = torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.avg_pool2d(pixels, blur, stride=1, padding=blur // 2)


def save_image_folder(folder: Path, images: torch.Tensor) -> Path:
    """Write images [N, 3, S, S] in [0, 1] as PNG files of one unlabelled folder."""
    from PIL import Image

    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(folder / f"{index}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> TinyArtifact:
    open_clip = import_open_clip()
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**copy.deepcopy(TINY_CFG)).eval()
    with torch.no_grad():  # random, not init-time values, so every tensor is distinctive
        for parameter in clip.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    prompts = PromptedVisionEncoder(clip.visual).new_prompts(PROMPT_START_BLOCK, PROMPT_TOKENS)
    parts = TinyArtifact(
        path=Path(),
        clip=clip,
        visual_prompts=prompts.tokens.detach().clone(),
        text_features=torch.randn(len(CLASSES), TINY_CFG["embed_dim"]),
        logit_scale=20.0,
        preprocess=Preprocess(32, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        base_model={"spec": "test", "sha256": None, "quick_gelu": False, "model_cfg": copy.deepcopy(TINY_CFG)},
    )
    parts.path = parts.save(tmp_path_factory.mktemp("artifact") / "purified")
    return parts


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path) -> Path:
    """A private copy of the shared tiny artifact, free to calibrate or damage."""
    return Path(shutil.copytree(tiny_artifact.path, tmp_path / "purified"))


@pytest.fixture(scope="module")
def clip(tiny_artifact):
    """The tiny artifact's whole open_clip CLIP (text tower included)."""
    return tiny_artifact.clip


@pytest.fixture(scope="module")
def tokenizer(clip):
    return import_open_clip().tokenizer.SimpleTokenizer(context_length=clip.context_length)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module (opt in with usefixtures): the tiny model gains
    nothing from them, and on a busy 2-core machine their spin-waits stretch each op from
    microseconds to ~10 ms, and threads of concurrent classify calls only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_artifact):
    """The tiny artifact served through guard.load on the CPU."""
    import guard

    with guard.load(tiny_artifact.path, device="cpu") as loaded:
        yield loaded


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict:
    """The reference models (clean and badnet; about 3 minutes on 2 cores), built once per
    session. Set CLIP_GUARD_TEST_ZOO to a directory to reuse a built zoo across runs."""
    from training.zoo import build_zoo

    if not os.path.isdir("/usr/share/datasets/fashion-mnist") and not os.environ.get("CLIP_GUARD_REQUIRE_DATA"):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    directory = os.environ.get("CLIP_GUARD_TEST_ZOO") or tmp_path_factory.mktemp("zoo")
    return build_zoo(directory)
