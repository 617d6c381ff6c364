"""training.models: every checkpoint layout is written exactly as its producer writes it,
loaded back with load_clip, and compared with the source model on weights and outputs."""
import copy
import importlib
import io
import json
import logging
import os
import pickle
import socket
import types
import zipfile

import pytest
import torch

from guard._compat import import_open_clip
from guard.errors import InputError, ModelLoadError
from guard.hashing import sha256_file
from training.models import LoadedCLIP, ModelIdentity, _detect_quick_gelu, load_clip, save_clip
from guard.preprocess import Preprocess

oc = import_open_clip()

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


def tiny_cfg(quick_gelu: bool) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["quick_gelu"] = quick_gelu
    return cfg


def make_model(quick_gelu: bool, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = oc.CLIP(**tiny_cfg(quick_gelu)).eval()
    with torch.no_grad():  # random, not init-time values, so every tensor is distinctive
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


def expect_error(match, fn, *args, **kwargs) -> ModelLoadError:
    with pytest.raises(ModelLoadError, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return info.value


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    tokens = oc.tokenizer.SimpleTokenizer(context_length=16)(["a photo of a dog", "a cat", "a trigger"])
    return images, tokens


@pytest.fixture(scope="module")
def models(batch):
    """Tiny CLIPs with QuickGELU (as OpenAI-derived weights) and with GELU."""
    quick, gelu = make_model(True, 1), make_model(False, 2)
    # The activation must be visible in the outputs, or these tests could not catch a wrong one.
    flipped = oc.CLIP(**tiny_cfg(False)).eval()
    flipped.load_state_dict(quick.state_dict())
    images, tokens = batch
    with torch.no_grad():
        assert not torch.allclose(flipped.encode_image(images), quick.encode_image(images), atol=1e-4)
        assert not torch.allclose(flipped.encode_text(tokens), quick.encode_text(tokens), atol=1e-4)
    return {True: quick, False: gelu}


def assert_same_model(loaded: LoadedCLIP, source: torch.nn.Module, batch) -> None:
    model = loaded.model
    assert isinstance(model, oc.CLIP)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ours, theirs = model.state_dict(), source.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value.float()), key
    images, tokens = batch
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), source.encode_image(images), atol=1e-6, rtol=0)
        torch.testing.assert_close(model.encode_text(tokens), source.encode_text(tokens), atol=1e-6, rtol=0)
    assert loaded.tokenizer.context_length == model.context_length == 16
    assert torch.equal(loaded.tokenizer(["a cat"]), oc.tokenizer.SimpleTokenizer(context_length=16)(["a cat"]))
    assert loaded.preprocess.image_size == 32


def assert_rebuilds(identity: ModelIdentity, source: torch.nn.Module) -> None:
    """identity.model_cfg alone rebuilds the architecture with open_clip's CLIP class."""
    rebuilt = oc.CLIP(**copy.deepcopy(identity.model_cfg))
    rebuilt.load_state_dict(source.state_dict(), strict=True)
    assert identity.model_cfg["quick_gelu"] is identity.quick_gelu
    json.dumps(identity.to_dict())


# --------------------------------------------------------------------------- formats

@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_state_dict(tmp_path, models, batch, suffix):
    from safetensors.torch import save_file

    source = models[False]
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    loaded = load_clip(str(path), quick_gelu=False)
    assert_same_model(loaded, source, batch)
    identity = loaded.identity
    assert identity.source_format == "open_clip-state-dict"
    assert identity.sha256 == sha256_file(path)
    assert identity.quick_gelu is False and identity.spec == str(path)
    assert identity.model_cfg["vision_cfg"]["patch_size"] == 8
    assert identity.model_cfg["text_cfg"]["heads"] == 1  # width 64 // 64
    assert loaded.preprocess == Preprocess(32, oc.OPENAI_DATASET_MEAN, oc.OPENAI_DATASET_STD)
    assert_rebuilds(identity, source)


def test_custom_text_state_dict(tmp_path, models, batch):
    """open_clip's CustomTextCLIP names (text.transformer...) load into the same CLIP."""
    source = models[True]
    path = tmp_path / "custom_text.pt"
    torch.save(oc.model.convert_to_custom_text_state_dict(source.state_dict()), path)
    loaded = load_clip(path, quick_gelu=True)
    assert_same_model(loaded, source, batch)
    assert loaded.identity.source_format == "open_clip-state-dict"


def test_openai_state_dict(tmp_path, models, batch):
    """As OpenAI's clip package keeps it: float16 weights beside float32 LayerNorms, plus
    the input_resolution / context_length / vocab_size tensors."""
    source = copy.deepcopy(models[True])
    oc.model.convert_weights_to_lp(source)  # OpenAI's convert_weights: fp16 linear/conv/attention/proj
    state = source.state_dict()
    assert {v.dtype for v in state.values()} == {torch.float16, torch.float32}
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16), vocab_size=torch.tensor(49408))
    path = tmp_path / "ViT-tiny.pt"
    torch.save(state, path)
    source.float()  # the fp16-rounded weights are what the file holds
    loaded = load_clip(str(path), quick_gelu=True)
    assert_same_model(loaded, source, batch)
    assert loaded.identity.source_format == "openai-state-dict"
    assert loaded.identity.quick_gelu is True
    assert_rebuilds(loaded.identity, source)


def test_training_checkpoint(tmp_path, models, batch):
    """CleanCLIP / BadCLIP (and open_clip training) checkpoints: module.-prefixed keys under
    state_dict, beside epoch and optimizer state."""
    source = models[True]
    checkpoint = {
        "epoch": 3,
        "name": "cleanclip-finetune",
        "state_dict": {"module." + k: v for k, v in source.state_dict().items()},
        "optimizer": {"state": {0: {"step": torch.tensor(30.0), "exp_avg": torch.zeros(4)}},
                      "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.98), "weight_decay": 0.1, "params": [0]}]},
    }
    path = tmp_path / "epoch_3.pt"
    torch.save(checkpoint, path)
    loaded = load_clip(str(path), quick_gelu=True)
    assert_same_model(loaded, source, batch)
    assert loaded.identity.source_format == "training-checkpoint"
    assert loaded.identity.sha256 == sha256_file(path)


def test_resnet_image_tower_is_inferred(tmp_path, batch):
    cfg = {"embed_dim": 32, "quick_gelu": False,
           "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
           "text_cfg": TINY["text_cfg"]}
    torch.manual_seed(3)
    source = oc.CLIP(**cfg).eval()
    path = tmp_path / "rn.pt"
    torch.save(source.state_dict(), path)
    loaded = load_clip(str(path), quick_gelu=False)
    assert_same_model(loaded, source, batch)
    assert loaded.identity.model_cfg["vision_cfg"]["layers"] == [1, 1, 1, 1]
    assert_rebuilds(loaded.identity, source)


def save_torchscript(model, path, how: str) -> torch.jit.ScriptModule:
    images, tokens = torch.ones(2, 3, 32, 32), torch.zeros(2, 16, dtype=torch.long)
    if how == "trace":  # what open_clip's trace_model does, with the example inputs it uses
        scripted = torch.jit.trace_module(model, {"forward": (images, tokens), "encode_image": (images,),
                                                  "encode_text": (tokens,)})
    else:
        scripted = torch.jit.script(model)
    torch.jit.save(scripted, str(path))
    return scripted


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("how", ["trace", "script"])
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_torchscript_archive(tmp_path, models, batch, monkeypatch, how, quick_gelu):
    source = models[quick_gelu]
    path = tmp_path / "ViT-tiny.pt"
    scripted = save_torchscript(source, path, how)
    names = zipfile.ZipFile(path).namelist()
    assert any(n.endswith("/data.pkl") for n in names) and any("/code/" in n for n in names)
    assert any(n.endswith("/constants.pkl") for n in names)

    def refuse(*args, **kwargs):
        raise AssertionError("load_clip must not run the archive through torch.jit.load")
    monkeypatch.setattr(torch.jit, "load", refuse)
    loaded = load_clip(str(path))  # no quick_gelu: read from the archive's code
    assert loaded.identity.quick_gelu is quick_gelu
    assert loaded.identity.source_format == "openai-torchscript"
    assert loaded.identity.sha256 == sha256_file(path)
    assert_same_model(loaded, source, batch)
    # ... and equal to what TorchScript itself holds (its state dict also keeps the attn_mask buffer).
    script_state = {k: v for k, v in scripted.state_dict().items() if k != "attn_mask"}
    assert set(script_state) == set(loaded.model.state_dict())
    for key, value in script_state.items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert_rebuilds(loaded.identity, source)
    # An explicit quick_gelu that agrees is accepted; one that contradicts the code is refused.
    assert load_clip(str(path), quick_gelu=quick_gelu).identity.quick_gelu is quick_gelu
    expect_error("contradicts", load_clip, str(path), quick_gelu=not quick_gelu)


def test_quick_gelu_detection_reads_openai_style_code():
    """The clip package's scripted QuickGELU, as its archives print it."""
    openai_code = ("class QuickGELU(Module):\n  __parameters__ = []\n  __buffers__ = []\n"
                   "  def forward(self: __torch__.clip.model.QuickGELU, x: Tensor) -> Tensor:\n"
                   "    return torch.mul(x, torch.sigmoid(torch.mul(x, 1.702)))\n")
    assert _detect_quick_gelu(set(), [openai_code.replace("QuickGELU", "Act")]) is True
    assert _detect_quick_gelu({"__torch__.clip.model.QuickGELU"}, []) is True
    assert _detect_quick_gelu(set(), ["    return torch.gelu(argument_1)\n"]) is False
    assert _detect_quick_gelu(set(), ["    return torch.relu(x)\n"]) is None
    assert _detect_quick_gelu({"__torch__.a.QuickGELU", "__torch__.b.GELU"}, []) is None


# --------------------------------------------------------------------------- local dirs

def test_save_clip_local_dir_roundtrip(tmp_path, models, batch):
    source = models[True]
    preprocess = Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", "squash")
    out = save_clip(source, tiny_cfg(True), preprocess, tmp_path / "purified")
    assert out == tmp_path / "purified"
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config == {"model_cfg": tiny_cfg(True), "preprocess_cfg": preprocess.to_open_clip()}

    for spec in (str(out), "local-dir:" + str(out)):
        loaded = load_clip(spec)
        assert_same_model(loaded, source, batch)
        assert loaded.identity.source_format == "local-dir"
        assert loaded.identity.quick_gelu is True
        assert loaded.identity.sha256 == sha256_file(out / "open_clip_model.safetensors")
        assert loaded.identity.model_cfg == tiny_cfg(True)
        assert loaded.preprocess == preprocess

    # open_clip reads the same directory into the same model.
    theirs = oc.create_model("local-dir:" + str(out)).eval()
    images, tokens = batch
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(images), source.encode_image(images), atol=1e-6, rtol=0)
        torch.testing.assert_close(theirs.encode_text(tokens), source.encode_text(tokens), atol=1e-6, rtol=0)
    assert Preprocess.from_open_clip(theirs.visual.preprocess_cfg) == preprocess
    assert oc.get_tokenizer("local-dir:" + str(out)).context_length == 16


def test_save_clip_handles_shared_tensors(tmp_path, models, batch):
    source = copy.deepcopy(models[False])
    source.text_projection = source.visual.proj  # tied: one storage under two names
    state = source.state_dict()
    assert state["text_projection"].data_ptr() == state["visual.proj"].data_ptr()
    out = save_clip(source, tiny_cfg(False), Preprocess(32, (0.5,) * 3, (0.5,) * 3), tmp_path / "tied")
    assert_same_model(load_clip(str(out)), source, batch)


def test_save_clip_refuses_a_wrong_quick_gelu(tmp_path, models):
    with pytest.raises(InputError, match="QuickGELU"):
        save_clip(models[True], tiny_cfg(False), Preprocess(32, (0.5,) * 3, (0.5,) * 3), tmp_path / "x")
    cfg = copy.deepcopy(TINY)  # no quick_gelu key: taken from the model
    out = save_clip(models[True], cfg, Preprocess(32, (0.5,) * 3, (0.5,) * 3), tmp_path / "y")
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["quick_gelu"] is True


def test_local_dir_written_by_open_clip(tmp_path, models, batch):
    """The layout of open_clip's own save_for_hf (config + open_clip_pytorch_model.bin)."""
    source = copy.deepcopy(models[True])
    oc.model.set_model_preprocess_cfg(source, {"mean": oc.OPENAI_DATASET_MEAN, "std": oc.OPENAI_DATASET_STD,
                                               "interpolation": "bicubic", "resize_mode": "shortest"})
    no_tokenizer_files = types.SimpleNamespace(save_pretrained=lambda directory: None)
    out = tmp_path / "hf_layout"
    hf_writer = importlib.import_module("open_clip.push_to_hf_hub")
    hf_writer.save_for_hf(source, no_tokenizer_files, tiny_cfg(True), str(out), safe_serialization=False)
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_pytorch_model.bin"]
    loaded = load_clip("local-dir:" + str(out))
    assert_same_model(loaded, source, batch)
    assert loaded.identity.quick_gelu is True
    assert loaded.identity.sha256 == sha256_file(out / "open_clip_pytorch_model.bin")
    assert loaded.preprocess == Preprocess(32, oc.OPENAI_DATASET_MEAN, oc.OPENAI_DATASET_STD)
    expect_error("contradicts", load_clip, str(out), quick_gelu=False)


def test_local_dir_without_config(tmp_path, models):
    torch.save(models[False].state_dict(), tmp_path / "weights.pt")
    expect_error("no open_clip_config.json", load_clip, "local-dir:" + str(tmp_path))


# --------------------------------------------------------------------------- arch and quick_gelu

@pytest.fixture
def tiny_arch(monkeypatch):
    """Our tiny config registered as open_clip model names, as arch= looks them up."""
    monkeypatch.setitem(oc.factory._MODEL_CONFIGS, "guard-tiny", tiny_cfg(False))
    monkeypatch.setitem(oc.factory._MODEL_CONFIGS, "guard-tiny-quickgelu", tiny_cfg(True))
    wider = tiny_cfg(False)
    wider["embed_dim"] = 48
    monkeypatch.setitem(oc.factory._MODEL_CONFIGS, "guard-tiny-wide", wider)


def test_bare_weights_need_quick_gelu(tmp_path, models):
    path = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file
    save_file(models[True].state_dict(), str(path))
    error = expect_error("quick_gelu=True", load_clip, str(path))
    assert "CleanCLIP" in str(error) and "BadCLIP" in str(error) and "quick_gelu=False" in str(error)


def test_arch_settles_quick_gelu(tmp_path, models, batch, tiny_arch, caplog):
    quick_path, gelu_path = tmp_path / "quick.pt", tmp_path / "gelu.pt"
    torch.save(models[True].state_dict(), quick_path)
    torch.save(models[False].state_dict(), gelu_path)

    loaded = load_clip(str(quick_path), arch="guard-tiny-quickgelu")
    assert_same_model(loaded, models[True], batch)
    assert loaded.identity.quick_gelu is True and loaded.identity.model_cfg == tiny_cfg(True)

    loaded = load_clip(str(gelu_path), arch="guard-tiny")
    assert_same_model(loaded, models[False], batch)
    assert loaded.identity.quick_gelu is False

    with caplog.at_level(logging.INFO, logger="training.models"):
        loaded = load_clip(str(quick_path), arch="guard-tiny", quick_gelu=True)
    assert_same_model(loaded, models[True], batch)
    assert loaded.identity.model_cfg["quick_gelu"] is True
    assert "overrides" in caplog.text

    expect_error("unknown open_clip architecture", load_clip, str(quick_path), arch="no-such-arch")
    expect_error("do not fit", load_clip, str(gelu_path), arch="guard-tiny-wide")


# --------------------------------------------------------------------------- safety and errors

class CustomPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_python_objects_is_refused(tmp_path, models):
    marker = tmp_path / "executed"
    path = tmp_path / "trojan.pt"
    torch.save({"state_dict": models[False].state_dict(), "hook": CustomPayload(marker)}, path)
    expect_error("refusing to unpickle", load_clip, str(path), quick_gelu=False)
    assert not marker.exists()

    plain = tmp_path / "object.pt"
    torch.save({"state_dict": models[False].state_dict(), "args": types.SimpleNamespace(lr=1.0)}, plain)
    expect_error("refusing to unpickle", load_clip, str(plain), quick_gelu=False)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_torchscript_with_foreign_global_is_refused(tmp_path, models):
    marker = tmp_path / "executed"
    source = tmp_path / "clean.pt"
    save_torchscript(models[True], source, "script")
    payload = io.BytesIO()
    pickle.Pickler(payload, protocol=2).dump(CustomPayload(marker))
    path = tmp_path / "trojan.pt"
    with zipfile.ZipFile(source) as clean, zipfile.ZipFile(path, "w") as trojan:
        for info in clean.infolist():
            data = payload.getvalue() if info.filename.endswith("/data.pkl") else clean.read(info)
            trojan.writestr(info, data)
    expect_error(r"refusing to unpickle (posix|os)\.system", load_clip, str(path))
    assert not marker.exists()


def test_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint\xff" * 64)
    expect_error("not a readable", load_clip, str(garbage), quick_gelu=False)
    bad_safetensors = tmp_path / "garbage.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken json...}")
    expect_error("not a readable safetensors", load_clip, str(bad_safetensors), quick_gelu=False)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    expect_error("not a state dict", load_clip, str(tensor_only), quick_gelu=False)


def test_unknown_layout(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "resnet18.safetensors"
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(10, 4)}, str(path))
    expect_error("layout", load_clip, str(path), quick_gelu=False)


def test_missing_paths(tmp_path):
    expect_error("no such file", load_clip, str(tmp_path / "nope.pt"), quick_gelu=True)
    expect_error("no such file", load_clip, "./checkpoints/epoch_3.pt")
    expect_error("no such directory", load_clip, "local-dir:" + str(tmp_path / "nope"))
    expect_error("load_clip", load_clip, "")
    expect_error("add a pretrained tag", load_clip, "ViT-B-32")


def test_unknown_pretrained_name_or_tag():
    expect_error("list_pretrained", load_clip, "NoSuchModel-B-32:openai")
    error = expect_error("unknown pretrained tag", load_clip, "ViT-B-32:no_such_tag")
    assert "laion2b_s34b_b79k" in str(error) and "list_pretrained" in str(error)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty Hub cache, and any network use fails the test."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("load_clip must not start a Hub download here")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_pretrained_tag_offline_fails_without_network(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_socket(*args, **kwargs):
        raise AssertionError("HF_HUB_OFFLINE is set: no connection may be attempted")
    monkeypatch.setattr(socket, "create_connection", no_socket)
    error = expect_error("could not fetch the weights", load_clip, "ViT-B-32:openai")
    assert "HF_HUB_OFFLINE" in str(error) and "local checkpoint path" in str(error)
    expect_error("HF_HUB_OFFLINE", load_clip, "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")


def test_pretrained_tag_unreachable_hub_fails_fast(monkeypatch, no_network):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    error = expect_error("unreachable", load_clip, "ViT-B-32:laion2b_s34b_b79k")
    assert "HF_HUB_OFFLINE=1" in str(error)


def test_pretrained_tag_from_cache(monkeypatch, tmp_path, models, batch, tiny_arch):
    """A tag whose weights are in the Hub cache loads with no network, QuickGELU from the tag."""
    from safetensors.torch import save_file

    from training import models as guard_models
    monkeypatch.setitem(oc.pretrained._PRETRAINED, "guard-tiny",
                        {"openai": oc.pretrained._pcfg(hf_hub="guard/tiny-openai/", quick_gelu=True)})
    weights = tmp_path / "snapshot" / "open_clip_model.safetensors"
    weights.parent.mkdir()
    save_file(models[True].state_dict(), str(weights))

    def cached(repo_id, filenames, what):
        assert repo_id == "guard/tiny-openai" and "open_clip_model.safetensors" in filenames
        return str(weights)
    monkeypatch.setattr(guard_models, "_hf_fetch", cached)
    loaded = load_clip("guard-tiny:openai")
    assert_same_model(loaded, models[True], batch)  # quick_gelu from the tag, though guard-tiny is GELU
    assert loaded.identity.source_format == "open_clip-pretrained"
    assert loaded.identity.quick_gelu is True and loaded.identity.model_cfg["quick_gelu"] is True
    assert loaded.identity.sha256 == sha256_file(weights)
    expect_error("contradicts", load_clip, "guard-tiny:openai", quick_gelu=False)
