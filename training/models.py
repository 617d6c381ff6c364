"""Load CLIP models from the formats people actually have, and save them in one.

`load_clip(spec)` accepts:

* ``local-dir:DIR`` or a plain directory path: an ``open_clip_config.json``
  (``{"model_cfg": ..., "preprocess_cfg": ...}``) beside the weights, the layout
  `save_clip` writes and open_clip reads with ``create_model("local-dir:DIR")``.
* a weights file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``), recognised by its
  content: an open_clip state dict, a state dict of OpenAI's ``clip`` package, a
  training checkpoint ``{"state_dict": {"module.<key>": ...}, "epoch": ..., ...}``
  (open_clip, CleanCLIP and BadCLIP all save these) or a TorchScript archive as the
  ``clip`` package distributes its models.
* ``NAME:TAG``, an open_clip model name and pretrained tag (``ViT-B-32:openai``).
* ``hf-hub:org/repo``, an open_clip model on the Hugging Face Hub.

Safety: nothing is unpickled beyond tensors and plain containers. Pickled
checkpoints go through ``torch.load(weights_only=True)`` only; TorchScript archives
are never handed to ``torch.jit.load`` (which would load the archive's code): their
``data.pkl`` is read with a restricted unpickler that only rebuilds tensors.

QuickGELU: OpenAI-derived weights were trained with QuickGELU, others mostly with
GELU, and a state dict cannot tell them apart. The activation comes from a config
where there is one (local dirs, pretrained tags), is detected from the code of a
TorchScript archive, and must otherwise be given (``quick_gelu=`` or an ``arch=``
whose config settles it); `load_clip` never guesses.

Architecture inference (bare weights without ``arch=``) follows OpenAI's
``build_model``: widths, depths, patch size, image size, context length and vocabulary
come from tensor shapes; attention heads cannot be read from weights and are taken as
``width // 64`` (64-wide heads, CLIP's convention for every released model). Pass
``arch=`` (an open_clip model name) for anything else.
"""
from __future__ import annotations

import collections
import copy
import io
import json
import logging
import math
import os
import pickle
import re
import socket
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch

from guard._compat import import_open_clip
from guard.errors import InputError, ModelLoadError
from guard.hashing import sha256_file
from guard.preprocess import Preprocess

log = logging.getLogger(__name__)

SOURCE_FORMATS = ("open_clip-pretrained", "hf-hub", "local-dir", "open_clip-state-dict",
                  "openai-state-dict", "openai-torchscript", "training-checkpoint")
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# Preference order of weights in a local dir; then any *.safetensors, then *.bin/*.pt/*.pth.
_DIR_WEIGHTS_PREFERRED = (WEIGHTS_NAME, "open_clip_pytorch_model.bin")
_DIR_WEIGHTS_FALLBACK = ((".safetensors",), (".bin", ".pt", ".pth"))
# Tensors in OpenAI's state dicts that describe rather than parametrise the model.
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
_TEXT_TOWER_PREFIXES = ("text_projection", "positional_embedding", "token_embedding", "transformer.", "ln_final")
_CLIP_HEAD_WIDTH = 64  # CLIP's convention: attention heads are 64 wide
_HF_HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ModelIdentity:
    """Where a loaded model came from. `sha256` is that of the weights file (None when the
    file is not known); `model_cfg` is an open_clip model config that rebuilds the
    architecture (`open_clip.CLIP(**model_cfg)` for plain CLIP configs)."""
    spec: str
    source_format: str
    sha256: str | None
    quick_gelu: bool
    model_cfg: dict

    def to_dict(self) -> dict:
        return {"spec": self.spec, "source_format": self.source_format, "sha256": self.sha256,
                "quick_gelu": self.quick_gelu, "model_cfg": copy.deepcopy(self.model_cfg)}


@dataclass
class LoadedCLIP:
    model: torch.nn.Module  # open_clip CLIP, float32, eval mode, on the requested device
    tokenizer: Callable
    preprocess: Preprocess
    identity: ModelIdentity


# --------------------------------------------------------------------------- public API

def load_clip(spec: str, *, arch: str | None = None, quick_gelu: bool | None = None,
              device: str | torch.device = "cpu") -> LoadedCLIP:
    """Load a CLIP model from `spec` (see the module docstring for the accepted forms).

    arch: open_clip model name ("ViT-B-32", "ViT-B-32-quickgelu", ...) giving the
        architecture of a bare weights file instead of inferring it from tensor shapes.
    quick_gelu: the activation of bare weights (True for OpenAI-derived weights). For
        sources that record it (configs, pretrained tags, TorchScript code) it is checked
        and a contradiction raises ModelLoadError.
    Raises ModelLoadError (a ValueError) with a message that says what to do.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"load_clip needs a path, 'local-dir:DIR', 'NAME:TAG' or 'hf-hub:org/repo'; got {spec!r}")
    if quick_gelu is not None and not isinstance(quick_gelu, bool):
        raise ModelLoadError(f"quick_gelu must be True, False or None, got {quick_gelu!r}")
    if arch is not None and (not isinstance(arch, str) or not arch):
        raise ModelLoadError(f"arch must be an open_clip model name such as 'ViT-B-32', got {arch!r}")
    target = _device(device)
    oc = import_open_clip()

    if spec.startswith("local-dir:"):
        loaded = _load_local_dir(oc, spec, Path(spec[len("local-dir:"):]).expanduser(), arch, quick_gelu)
    elif spec.startswith("hf-hub:"):
        loaded = _load_hf_hub(oc, spec, spec[len("hf-hub:"):], arch, quick_gelu)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            loaded = _load_local_dir(oc, spec, path, arch, quick_gelu)
        elif path.is_file():
            loaded = _load_weights_file(oc, spec, path, arch, quick_gelu)
        elif path.exists():
            raise ModelLoadError(f"{spec} is neither a regular file nor a directory")
        else:
            loaded = _load_named(oc, spec, arch, quick_gelu)

    try:
        loaded.model.to(target)
    except (RuntimeError, AssertionError) as error:
        raise ModelLoadError(f"could not move the model to {target}: {error}") from error
    return loaded


def save_clip(model: torch.nn.Module, model_cfg: dict, preprocess: Preprocess, out_dir) -> Path:
    """Write `model` as an open_clip local dir: out_dir/open_clip_config.json
    ({"model_cfg", "preprocess_cfg"}) and out_dir/open_clip_model.safetensors. Readable by
    `load_clip(out_dir)` and by `open_clip.create_model("local-dir:" + out_dir)`."""
    if not isinstance(preprocess, Preprocess):
        raise InputError(f"preprocess must be a guard.preprocess.Preprocess, got {type(preprocess).__name__}")
    if not isinstance(model_cfg, Mapping) or not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise InputError("model_cfg must be an open_clip model config with embed_dim, vision_cfg and text_cfg")
    oc = import_open_clip()
    cfg = copy.deepcopy(dict(model_cfg))
    used = _model_activation(oc, model)
    if "quick_gelu" in cfg:
        if used is not None and bool(cfg["quick_gelu"]) != used:
            raise InputError(f"model_cfg says quick_gelu={cfg['quick_gelu']} but the model's blocks use "
                             f"{'QuickGELU' if used else 'GELU'}; fix model_cfg so the saved model rebuilds right")
        cfg["quick_gelu"] = bool(cfg["quick_gelu"])
    elif used is not None:
        cfg["quick_gelu"] = used
    else:
        raise InputError("model_cfg has no quick_gelu and the model's activation cannot be told; add quick_gelu")
    try:
        config_text = json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess.to_open_clip()}, indent=2)
    except TypeError as error:
        raise InputError(f"model_cfg is not JSON-serialisable: {error}") from error

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights_tmp, config_tmp = out / (WEIGHTS_NAME + ".tmp"), out / (CONFIG_NAME + ".tmp")
    save_file(_independent_tensors(model.state_dict()), str(weights_tmp), metadata={"format": "pt"})
    config_tmp.write_text(config_text + "\n", encoding="utf-8")
    os.replace(weights_tmp, out / WEIGHTS_NAME)
    os.replace(config_tmp, out / CONFIG_NAME)
    return out


# --------------------------------------------------------------------------- spec forms

def _load_named(oc, spec: str, arch, quick_gelu) -> LoadedCLIP:
    """A spec that is no existing path: NAME:TAG, else a missing file."""
    name, sep, tag = spec.partition(":")
    name_clean = name.replace("/", "-")
    known_model = bool(name) and name_clean in oc.list_models()
    if sep and tag and known_model:
        return _load_pretrained(oc, spec, name_clean, tag, arch, quick_gelu)
    if known_model and not sep:
        tags = oc.list_pretrained_tags_by_model(name_clean)
        raise ModelLoadError(f"{spec!r} is an open_clip model name without weights; add a pretrained tag, "
                             f"'{spec}:TAG' with TAG one of {tags or 'none (see open_clip.list_pretrained())'}")
    forms = ("a weights file, a directory, 'local-dir:DIR', 'NAME:TAG' (open_clip pretrained, e.g. "
             "'ViT-B-32:openai') or 'hf-hub:org/repo'")
    path_like = any(c in spec for c in "/\\") or spec.startswith((".", "~")) \
        or Path(spec).suffix in (".pt", ".pth", ".bin", ".safetensors")
    if sep and not path_like:
        raise ModelLoadError(
            f"unknown open_clip model name {name!r} in {spec!r}; list the valid NAME:TAG pairs with "
            "`python -c \"import open_clip; print(open_clip.list_pretrained(as_str=True))\"`")
    raise ModelLoadError(f"no such file or directory: {spec!r}; load_clip expects {forms}")


def _load_pretrained(oc, spec, name, tag, arch, quick_gelu) -> LoadedCLIP:
    tag_cfg = oc.pretrained.get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = oc.list_pretrained_tags_by_model(name)
        raise ModelLoadError(
            f"unknown pretrained tag {tag!r} for open_clip model {name}; its tags are {tags or 'none'}. "
            "List all NAME:TAG pairs with open_clip.list_pretrained(as_str=True)")
    if arch is not None and arch.replace("/", "-") != name:
        raise ModelLoadError(f"arch={arch!r} contradicts {spec!r}; "
                             "the architecture of a pretrained tag is its model name")
    model_cfg = oc.get_model_config(name)
    # The tag records how its weights were trained; open_clip's own model config may not
    # (ViT-B-32 is GELU, its `openai` weights need QuickGELU).
    weights_quick_gelu = bool(tag_cfg.get("quick_gelu", model_cfg.get("quick_gelu", False)))
    _check_explicit(quick_gelu, weights_quick_gelu, f"the weights of {spec}")
    if weights_quick_gelu != bool(model_cfg.get("quick_gelu", False)):
        log.info("%s was trained with quick_gelu=%s; building %s accordingly", spec, weights_quick_gelu, name)
    model_cfg["quick_gelu"] = weights_quick_gelu

    weights = _fetch_pretrained(oc, tag_cfg, spec)
    preprocess_overlay = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    try:
        model = oc.create_model(name, pretrained=str(weights), force_preprocess_cfg=preprocess_overlay,
                                quick_gelu=weights_quick_gelu)
    except (RuntimeError, ValueError, OSError, KeyError) as error:
        raise ModelLoadError(f"open_clip could not build {spec} from {weights}: {error}") from error
    model.float().eval()
    try:
        preprocess = Preprocess.from_open_clip(model.visual.preprocess_cfg)
    except InputError as error:
        raise ModelLoadError(f"the preprocessing of {spec} is not supported here: {error}") from error
    identity = ModelIdentity(spec, "open_clip-pretrained", sha256_file(weights), weights_quick_gelu, model_cfg)
    return LoadedCLIP(model, _tokenizer(oc, model, model_cfg, name), preprocess, identity)


def _load_hf_hub(oc, spec, repo_id, arch, quick_gelu) -> LoadedCLIP:
    if not repo_id:
        raise ModelLoadError("empty repository after 'hf-hub:'; use 'hf-hub:org/repo'")
    config_path = Path(_hf_fetch(repo_id, ("open_clip_config.json",), spec))
    weights = Path(_hf_fetch(repo_id, _HF_HUB_WEIGHTS, spec))
    return _load_local_dir(oc, spec, config_path.parent, arch, quick_gelu, config_path=config_path,
                           weights=weights, source_format="hf-hub", tokenizer_source=spec)


def _load_local_dir(oc, spec, directory: Path, arch, quick_gelu, *, config_path: Path | None = None,
                    weights: Path | None = None, source_format="local-dir", tokenizer_source=None) -> LoadedCLIP:
    if not directory.is_dir():
        raise ModelLoadError(f"no such directory: {directory} (from {spec!r})")
    config_path = config_path or directory / CONFIG_NAME
    if not config_path.is_file():
        raise ModelLoadError(
            f"{directory} has no {CONFIG_NAME}, so its architecture is unknown; pass the weights file "
            f"itself with arch= and quick_gelu=, e.g. load_clip('{directory / 'weights.pt'}', arch='ViT-B-32', "
            "quick_gelu=True)")
    if arch is not None:
        raise ModelLoadError(f"arch={arch!r} is not used for {spec!r}: its architecture comes from {config_path}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read {config_path}: {error}") from error
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} must hold a JSON object with model_cfg and preprocess_cfg")
    model_cfg = config.get("model_cfg", config)
    if not isinstance(model_cfg, dict) or not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ModelLoadError(f"{config_path} has no open_clip model_cfg (embed_dim, vision_cfg, text_cfg)")
    model_cfg = copy.deepcopy(model_cfg)
    config_quick_gelu = bool(model_cfg.get("quick_gelu", False))  # open_clip's default
    _check_explicit(quick_gelu, config_quick_gelu, f"{config_path}")
    model_cfg["quick_gelu"] = config_quick_gelu

    weights = weights or _pick_dir_weights(directory)
    state_dict, _container, detected = _read_weights(weights)
    if detected is not None and detected != config_quick_gelu:
        raise ModelLoadError(f"{config_path} says quick_gelu={config_quick_gelu} but the code of the TorchScript "
                             f"archive {weights} uses {'QuickGELU' if detected else 'GELU'}; fix the config")
    _require_clip_layout(state_dict, weights)
    _drop_openai_meta(state_dict)
    model = _build_from_cfg(oc, model_cfg)
    _load_into(oc, model, state_dict, weights, f"the architecture in {config_path}")

    preprocess_cfg = config.get("preprocess_cfg") or {}
    merged = {"size": model.visual.image_size, "mean": oc.OPENAI_DATASET_MEAN, "std": oc.OPENAI_DATASET_STD,
              "interpolation": "bicubic", "resize_mode": "shortest"}
    merged.update({k: v for k, v in preprocess_cfg.items()
                   if k in ("mean", "std", "interpolation", "resize_mode") and v is not None})
    try:
        preprocess = Preprocess.from_open_clip(merged)
    except InputError as error:
        raise ModelLoadError(f"preprocess_cfg in {config_path} is unusable: {error}") from error
    identity = ModelIdentity(spec, source_format, sha256_file(weights), config_quick_gelu, model_cfg)
    source = tokenizer_source or f"local-dir:{directory}"
    return _finish(oc, model, preprocess, identity, source)


def _load_weights_file(oc, spec, path: Path, arch, quick_gelu) -> LoadedCLIP:
    state_dict, container, detected = _read_weights(path)
    _require_clip_layout(state_dict, path)
    if container == "torchscript":
        source_format = "openai-torchscript"
    elif container == "checkpoint":
        source_format = "training-checkpoint"
    elif _looks_openai(state_dict):
        source_format = "openai-state-dict"
    else:
        source_format = "open_clip-state-dict"
    _drop_openai_meta(state_dict)

    arch_cfg = None
    if arch is not None:
        arch_cfg = oc.get_model_config(arch)
        if arch_cfg is None:
            raise ModelLoadError(f"unknown open_clip architecture arch={arch!r}; see open_clip.list_models()")
    resolved = _resolve_quick_gelu(path, source_format, quick_gelu, detected, arch, arch_cfg)

    if arch_cfg is not None:
        model_cfg = copy.deepcopy(arch_cfg)
        model_cfg["quick_gelu"] = resolved
        model = _build_from_cfg(oc, model_cfg)
        hint = f"the architecture of arch={arch!r}; check that it is the model these weights belong to"
    else:
        state_dict = _plain_text_layout(state_dict)
        model_cfg = _infer_model_cfg(state_dict, resolved, path)
        model = _build_from_cfg(oc, model_cfg)
        hint = ("an architecture inferred from tensor shapes (heads = width // 64); pass arch= with the "
                "open_clip model name these weights belong to")
    _load_into(oc, model, state_dict, path, hint)
    size = model.visual.image_size
    preprocess = Preprocess.from_open_clip({"size": size, "mean": oc.OPENAI_DATASET_MEAN,
                                            "std": oc.OPENAI_DATASET_STD})
    identity = ModelIdentity(spec, source_format, sha256_file(path), resolved, model_cfg)
    return _finish(oc, model, preprocess, identity, arch)


def _finish(oc, model, preprocess: Preprocess, identity: ModelIdentity, tokenizer_source) -> LoadedCLIP:
    model.float().eval()
    if getattr(model.visual, "preprocess_cfg", None) is None:
        oc.model.set_model_preprocess_cfg(model, preprocess.to_open_clip())
    return LoadedCLIP(model, _tokenizer(oc, model, identity.model_cfg, tokenizer_source), preprocess, identity)


# --------------------------------------------------------------------------- QuickGELU

def _check_explicit(explicit: bool | None, recorded: bool, where: str) -> None:
    if explicit is not None and explicit != recorded:
        raise ModelLoadError(
            f"quick_gelu={explicit} contradicts {where}, which records quick_gelu={recorded}; "
            "drop the quick_gelu argument (the recorded value is what the weights were trained with)")


def _resolve_quick_gelu(path, source_format, explicit, detected, arch, arch_cfg) -> bool:
    if detected is not None:
        _check_explicit(explicit, detected, f"the code of the TorchScript archive {path}")
        if arch_cfg is not None and bool(arch_cfg.get("quick_gelu", False)) != detected:
            log.info("the code of %s uses %s; building arch=%s with quick_gelu=%s",
                     path, "QuickGELU" if detected else "GELU", arch, detected)
        return detected
    if explicit is not None:
        if arch_cfg is not None and bool(arch_cfg.get("quick_gelu", False)) != explicit:
            log.info("quick_gelu=%s overrides the quick_gelu=%s of arch=%s",
                     explicit, bool(arch_cfg.get("quick_gelu", False)), arch)
        return explicit
    if arch_cfg is not None:
        return bool(arch_cfg.get("quick_gelu", False))
    what = "TorchScript archive whose activation could not be read from its code" \
        if source_format == "openai-torchscript" else "bare weights file"
    raise ModelLoadError(
        f"{path} is a {what} ({source_format}), and weights alone do not say whether the model uses "
        "QuickGELU or GELU. OpenAI-derived weights (OpenAI CLIP, and fine-tunes of it such as CleanCLIP "
        "and BadCLIP checkpoints) need quick_gelu=True; models trained with open_clip's default configs "
        "need quick_gelu=False. Pass quick_gelu=True/False, or arch= with an open_clip model name that "
        "settles it (e.g. 'ViT-B-32-quickgelu' or 'ViT-B-32').")


def _model_activation(oc, model) -> bool | None:
    """True if the transformer blocks of `model` use QuickGELU, False if GELU, None if unknown."""
    block_types = tuple(getattr(oc.transformer, n) for n in ("ResidualAttentionBlock", "CustomResidualAttentionBlock")
                        if hasattr(oc.transformer, n))
    found = set()
    for module in model.modules():
        if isinstance(module, block_types) and hasattr(module, "mlp"):
            for sub in module.mlp.modules():
                if isinstance(sub, oc.transformer.QuickGELU):
                    found.add(True)
                elif type(sub) is torch.nn.GELU:
                    found.add(False)
    return found.pop() if len(found) == 1 else None


# --------------------------------------------------------------------------- building

def _build_from_cfg(oc, model_cfg: dict) -> torch.nn.Module:
    """Instantiate the open_clip class a model config describes, without fetching any weights."""
    cfg = copy.deepcopy(model_cfg)
    custom_text = bool(cfg.pop("custom_text", False))
    if isinstance(cfg.get("text_cfg"), dict) and cfg["text_cfg"].get("hf_model_name"):
        custom_text = True
        cfg["text_cfg"]["hf_model_pretrained"] = False
    if isinstance(cfg.get("vision_cfg"), dict) and cfg["vision_cfg"].get("timm_model_name"):
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    if custom_text:
        cls = oc.CoCa if "multimodal_cfg" in cfg else oc.CustomTextCLIP
    else:
        cls = oc.CLIP
    try:
        return cls(**cfg).float()
    except (TypeError, ValueError, RuntimeError, KeyError, OSError, AssertionError) as error:
        raise ModelLoadError(f"open_clip cannot build a {cls.__name__} from model_cfg {cfg}: {error}") from error


def _infer_model_cfg(sd: dict, quick_gelu: bool, source) -> dict:
    """An open_clip CLIP config from tensor shapes, the way OpenAI's build_model reads them."""
    def need(key):
        if key not in sd:
            raise ModelLoadError(f"cannot infer the architecture of {source}: it has no {key!r}; pass arch= "
                                 "with the open_clip model name these weights belong to")
        return sd[key]

    def heads_for(width, tower):
        if width % _CLIP_HEAD_WIDTH:
            raise ModelLoadError(
                f"cannot infer the {tower} attention heads of {source}: width {width} is not a multiple of "
                f"{_CLIP_HEAD_WIDTH} (CLIP's head width); pass arch= with the open_clip model name")
        return width // _CLIP_HEAD_WIDTH

    def grid(n_positions, what):
        side = round(math.sqrt(max(n_positions - 1, 0)))
        if side < 1 or side * side + 1 != n_positions:
            raise ModelLoadError(f"cannot infer the image size of {source}: {what} has {n_positions} positions, "
                                 "not a square grid plus a class token; pass arch=")
        return side

    def mlp_ratio(prefix, width):
        key = f"{prefix}0.mlp.c_fc.weight"
        return float(sd[key].shape[0]) / width if key in sd else 4.0

    if "visual.class_embedding" in sd or "visual.proj" in sd:  # ViT image tower
        conv = need("visual.conv1.weight")
        width, patch = int(conv.shape[0]), int(conv.shape[-1])
        if conv.ndim != 4 or conv.shape[-1] != conv.shape[-2]:
            raise ModelLoadError(f"cannot infer the patch size of {source} from visual.conv1.weight "
                                 f"{tuple(conv.shape)}; pass arch=")
        heads_for(width, "image tower")
        side = grid(need("visual.positional_embedding").shape[0], "visual.positional_embedding")
        vision_cfg = {"image_size": patch * side, "patch_size": patch, "width": width,
                      "layers": _count_blocks(sd, "visual.transformer.resblocks.", source),
                      "head_width": _CLIP_HEAD_WIDTH,
                      "mlp_ratio": mlp_ratio("visual.transformer.resblocks.", width)}
        if "visual.transformer.resblocks.0.ls_1.gamma" in sd:
            vision_cfg["ls_init_value"] = 1e-5  # layer scale present; the value is overwritten by the weights
    elif "visual.layer1.0.conv1.weight" in sd:  # ModifiedResNet image tower
        layers = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
        width = int(sd["visual.layer1.0.conv1.weight"].shape[0])
        if (width * 32) % _CLIP_HEAD_WIDTH:
            raise ModelLoadError(f"cannot infer the attention-pool heads of {source} (width {width}); pass arch=")
        side = grid(need("visual.attnpool.positional_embedding").shape[0], "visual.attnpool.positional_embedding")
        vision_cfg = {"image_size": side * 32, "layers": layers, "width": width, "head_width": _CLIP_HEAD_WIDTH}
    else:
        raise ModelLoadError(f"cannot infer the image tower of {source} (neither a ViT nor OpenAI's ResNet); "
                             "pass arch= with the open_clip model name these weights belong to")

    text_width = int(need("ln_final.weight").shape[0])
    projection = need("text_projection")
    text_cfg = {"context_length": int(need("positional_embedding").shape[0]),
                "vocab_size": int(need("token_embedding.weight").shape[0]),
                "width": text_width, "heads": heads_for(text_width, "text tower"),
                "layers": _count_blocks(sd, "transformer.resblocks.", source),
                "mlp_ratio": mlp_ratio("transformer.resblocks.", text_width)}
    if "transformer.resblocks.0.ls_1.gamma" in sd:
        text_cfg["ls_init_value"] = 1e-5
    return {"embed_dim": int(projection.shape[-1]), "quick_gelu": quick_gelu,
            "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def _count_blocks(sd, prefix, source) -> int:
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in sd
               if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    if not indices or indices != set(range(len(indices))):
        raise ModelLoadError(f"cannot infer the depth of {source}: blocks under {prefix!r} are "
                             f"{sorted(indices) or 'missing'}; pass arch=")
    return len(indices)


def _load_into(oc, model, state_dict: dict, source, hint: str) -> None:
    """Load strictly, after the layout conversions open_clip itself applies."""
    sd = dict(state_dict)
    custom_text_model = not hasattr(model, "positional_embedding") and hasattr(model, "text")
    if custom_text_model:
        sd = oc.model.convert_to_custom_text_state_dict(sd)
    else:
        sd = _plain_text_layout(sd)
    own = model.state_dict()
    non_persistent = {name for name, _ in model.named_buffers()} - set(own)
    for name in non_persistent:  # TorchScript archives keep buffers open_clip does not save (attn_mask)
        sd.pop(name, None)
    for name in ("logit_scale", "logit_bias"):
        if name in sd and name in own and sd[name].ndim != own[name].ndim and sd[name].numel() == own[name].numel():
            sd[name] = sd[name].reshape(own[name].shape)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as error:
        raise ModelLoadError(f"the weights in {source} do not fit {hint}: {error}") from error


def _plain_text_layout(sd: dict) -> dict:
    """CustomTextCLIP names of open_clip's own text tower (text.transformer...) -> CLIP names."""
    if not any(k.startswith("text.") for k in sd):
        return sd
    return {(k[len("text."):] if k.startswith("text.") and k[len("text."):].startswith(_TEXT_TOWER_PREFIXES)
             else k): v for k, v in sd.items()}


def _tokenizer(oc, model, model_cfg: dict, source):
    context_length = int(model.context_length)
    text_cfg = model_cfg.get("text_cfg") or {}
    if not text_cfg.get("hf_tokenizer_name") and not (source and "siglip" in str(source).lower()
                                                       and not str(source).startswith("local-dir:")):
        return oc.tokenizer.SimpleTokenizer(context_length=context_length, **(text_cfg.get("tokenizer_kwargs") or {}))
    try:
        return oc.get_tokenizer(source, context_length=context_length)
    except (OSError, ValueError, RuntimeError, ImportError) as error:
        raise ModelLoadError(f"could not build the tokenizer of {source}: {error}") from error


def _device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ModelLoadError(f"invalid device {device!r}: {error}") from error


# --------------------------------------------------------------------------- reading weights

def _pick_dir_weights(directory: Path) -> Path:
    for name in _DIR_WEIGHTS_PREFERRED:
        if (directory / name).is_file():
            return directory / name
    for suffixes in _DIR_WEIGHTS_FALLBACK:
        found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in suffixes)
        if found:
            if len(found) > 1:
                log.warning("several weights files in %s (%s); using %s", directory,
                            ", ".join(p.name for p in found), found[0].name)
            return found[0]
    raise ModelLoadError(f"{directory} has {CONFIG_NAME} but no weights file ({WEIGHTS_NAME}, "
                         "open_clip_pytorch_model.bin, *.safetensors, *.bin, *.pt or *.pth)")


def _read_weights(path: Path) -> tuple[dict, str, bool | None]:
    """(state dict, container, QuickGELU detected from TorchScript code or None).
    container: "safetensors" | "pickle" | "checkpoint" | "torchscript"."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
        size = path.stat().st_size
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
    if path.suffix == ".safetensors" or _is_safetensors_header(head, size):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu"), "safetensors", None
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ModelLoadError(f"{path} is not a readable safetensors file ({error}); re-download or "
                                 "re-save it") from error
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise ModelLoadError(f"{path} is a damaged zip archive: {error}") from error
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            sd, detected = _read_torchscript(path)
            return sd, "torchscript", detected
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))  # torch names the global it refused
        if refused:
            raise ModelLoadError(
                f"refusing to unpickle {refused.group(1)} from {path}: only tensors and plain containers are "
                "loaded, never arbitrary Python objects. If you trust the file, extract the weights yourself "
                "and re-save them: torch.save(checkpoint['state_dict'], 'weights.pt') or safetensors") from error
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint or safetensors file") from error
    except (RuntimeError, EOFError, OSError, ValueError, UnicodeDecodeError, zipfile.BadZipFile) as error:
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint ({error})") from error
    sd, is_checkpoint = _unwrap(obj, path)
    return sd, "checkpoint" if is_checkpoint else "pickle", None


def _is_safetensors_header(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + header_len <= size


def _unwrap(obj, path) -> tuple[dict, bool]:
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a state dict or a "
                             "{'state_dict': ...} checkpoint")
    is_checkpoint = False
    for key in ("state_dict", "model_state_dict"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner:
            obj, is_checkpoint = inner, True
            break
    sd = dict(obj)
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if not_tensors:
        raise ModelLoadError(f"{path} does not hold a state dict: entries {not_tensors[:5]} are not tensors "
                             "(a checkpoint should keep its weights under 'state_dict')")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, is_checkpoint


def _require_clip_layout(sd: dict, source) -> None:
    has_visual = any(k.startswith("visual.") for k in sd)
    has_text = "token_embedding.weight" in sd or any(k.startswith("text.") for k in sd)
    if not (has_visual and has_text):
        sample = sorted(sd)[:6]
        raise ModelLoadError(
            f"{source} does not hold CLIP weights in a layout this loader knows (open_clip/OpenAI names such "
            "as visual.conv1.weight and token_embedding.weight, possibly under 'module.' or inside a "
            f"{{'state_dict': ...}} checkpoint); its first keys are {sample}. Convert it to an open_clip "
            "state dict first")


def _looks_openai(sd: dict) -> bool:
    """OpenAI's clip package saves the descriptive tensors input_resolution/context_length/
    vocab_size and keeps LayerNorms float32 beside float16 weights; open_clip does neither."""
    if any(k in sd for k in _OPENAI_META_KEYS):
        return True
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    return torch.float16 in dtypes and torch.float32 in dtypes


def _drop_openai_meta(sd: dict) -> None:
    for key in _OPENAI_META_KEYS:
        sd.pop(key, None)


def _independent_tensors(state: Mapping) -> dict:
    """Contiguous CPU tensors that share no storage, as safetensors requires."""
    out, seen = {}, set()
    for key, value in state.items():
        tensor = value.detach().to("cpu")
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if not tensor.is_contiguous() or (ptr is not None and ptr in seen):
            tensor = tensor.contiguous().clone()
        elif ptr is not None and tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a view into a larger storage
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


# --------------------------------------------------------------------------- TorchScript

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _StorageType:
    """Stands in for torch.<X>Storage classes: carries the dtype, cannot be called."""
    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype


class _Storage:
    __slots__ = ("dtype", "untyped")

    def __init__(self, dtype, untyped):
        self.dtype, self.untyped = dtype, untyped


class _ScriptObject:
    """Stands in for a TorchScript module or class instance: records the state it was
    pickled with, runs nothing. Subclassed per TorchScript qualified name."""
    qualname = "__torch__"

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage record")
    tensor = torch.empty((0,), dtype=storage.dtype)
    # set_ checks that offset, size and stride stay inside the storage.
    return tensor.set_(storage.untyped, int(storage_offset), tuple(size), tuple(stride))


def _passthrough(value, *_type_info):
    return value


# torch.jit._pickle helpers that TorchScript uses to tag containers; all return their data.
_TORCHSCRIPT_HELPERS = {name: _passthrough for name in (
    "restore_type_tag", "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")}


class _TorchScriptUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl without executing anything.

    This is a restricted `pickle.Unpickler` (the only unpickling of untrusted data in this
    module, which the pre-commit grep for bare pickle load calls does not flag): find_class
    admits a tensor-rebuilding function, OrderedDict, storage dtypes and TorchScript's
    container tags, and maps every `__torch__.*` class to an inert `_ScriptObject` subclass.
    Any other global raises ModelLoadError("refusing to unpickle ...")."""

    def __init__(self, handle, read_record: Callable[[str], bytes], source):
        super().__init__(handle)
        self._read_record = read_record
        self._source = source
        self._storages: dict[str, _Storage] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch.jit._pickle" and name in _TORCHSCRIPT_HELPERS:
            return _TORCHSCRIPT_HELPERS[name]
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname, "__slots__": ()})
            return self._classes[qualname]
        raise ModelLoadError(f"refusing to unpickle {module}.{name} from the TorchScript archive {self._source}: "
                             "only tensors and TorchScript module state are read from it")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            raw = self._read_record(f"data/{key}")
            nbytes = int(numel) * torch.empty((), dtype=storage_type.dtype).element_size()
            if len(raw) < nbytes:
                raise pickle.UnpicklingError(f"storage data/{key} has {len(raw)} bytes, expected {nbytes}")
            if raw:
                untyped = torch.frombuffer(bytearray(raw), dtype=torch.uint8).untyped_storage()
            else:
                untyped = torch.empty((0,), dtype=torch.uint8).untyped_storage()
            self._storages[key] = _Storage(storage_type.dtype, untyped)
        return self._storages[key]

    @property
    def class_names(self) -> set[str]:
        return set(self._classes)


_QUICK_GELU_CODE = re.compile(r"torch\.sigmoid\(\s*torch\.mul\(\s*[\w.]+\s*,\s*(?:1\.702\d*|CONSTANTS\.c\d+)\s*\)")
_GELU_CODE = re.compile(r"torch\.gelu\(|functional\.gelu\(")
_CLASS_LINE = re.compile(r"^class (\w+)\(")
_DECL_LINE = re.compile(r"^\s+__(parameters|buffers)__ = \[(.*)\]")


def _read_torchscript(path: Path) -> tuple[dict, bool | None]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            data_pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if len(data_pkl) != 1:
                raise ModelLoadError(f"{path} looks like a TorchScript archive but has no single */data.pkl")
            prefix = data_pkl[0][: -len("data.pkl")]
            if prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() not in (b"", b"little"):
                raise ModelLoadError(f"{path} was saved big-endian; re-save it on a little-endian machine")
            code = {n[len(prefix) + len("code/"):]: archive.read(n).decode("utf-8", errors="replace")
                    for n in names if n.startswith(prefix + "code/") and n.endswith(".py")}
            unpickler = _TorchScriptUnpickler(io.BytesIO(archive.read(data_pkl[0])),
                                              lambda record: archive.read(prefix + record), path)
            root = unpickler.load()  # restricted: see _TorchScriptUnpickler
    except ModelLoadError:
        raise
    except (zipfile.BadZipFile, OSError, KeyError, EOFError, pickle.UnpicklingError, TypeError, ValueError,
            AttributeError, IndexError, RuntimeError) as error:
        raise ModelLoadError(f"cannot read the TorchScript archive {path}: {error}") from error
    if not isinstance(root, _ScriptObject):
        raise ModelLoadError(f"{path} is a TorchScript archive without a module at its root")

    declared = _declared_tensors(code)
    state_dict: dict[str, torch.Tensor] = {}
    _flatten_script_object(root, "", state_dict, declared, set())
    return state_dict, _detect_quick_gelu(unpickler.class_names, code.values())


def _declared_tensors(code: dict[str, str]) -> dict[str, set[str] | None]:
    """qualname -> names the archive's code declares as __parameters__ and __buffers__, or
    None for a class whose code does not declare both (then all its tensors are taken)."""
    found: dict[str, dict[str, set[str]]] = {}
    for relative, text in code.items():
        if not relative.startswith("__torch__/"):
            continue
        module = "__torch__." + relative[len("__torch__/"):-len(".py")].replace("/", ".")
        current = None
        for line in text.splitlines():
            match = _CLASS_LINE.match(line)
            if match:
                current = found.setdefault(f"{module}.{match.group(1)}", {})
                continue
            match = _DECL_LINE.match(line)
            if match and current is not None:
                current.setdefault(match.group(1), set()).update(re.findall(r'"([^"]+)"', match.group(2)))
    return {name: (decl["parameters"] | decl["buffers"]) if len(decl) == 2 else None
            for name, decl in found.items()}


def _flatten_script_object(obj: _ScriptObject, prefix: str, out: dict, declared: dict, visiting: set) -> None:
    """Parameters and buffers of `obj` and its submodules, keyed like Module.state_dict()."""
    state = getattr(obj, "state", None)
    if not isinstance(state, dict) or id(obj) in visiting:
        return
    visiting.add(id(obj))
    names = declared.get(type(obj).qualname)
    for name, value in state.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, torch.Tensor):
            # Tensor attributes that are neither parameters nor buffers are not model weights.
            if names is None or name in names:
                out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _flatten_script_object(value, f"{prefix}{name}.", out, declared, visiting)
    visiting.discard(id(obj))


def _detect_quick_gelu(class_names, code_texts) -> bool | None:
    """True if the archive's modules/code use QuickGELU, False if GELU, None if unclear."""
    short = {name.rsplit(".", 1)[-1] for name in class_names}
    texts = list(code_texts)
    quick = "QuickGELU" in short or any(_QUICK_GELU_CODE.search(t) or re.search(r"\bQuickGELU\b", t)
                                        for t in texts)
    gelu = "GELU" in short or any(_GELU_CODE.search(t) for t in texts)
    if quick != gelu:
        return quick
    return None


# --------------------------------------------------------------------------- fetching

def _fetch_pretrained(oc, tag_cfg: dict, spec: str) -> Path:
    if tag_cfg.get("file"):
        return Path(tag_cfg["file"])
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)  # "org/repo/" means the default file name
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = []
        if filename == "open_clip_pytorch_model.bin":
            candidates.append("open_clip_model.safetensors")
        elif filename.endswith((".bin", ".pth")):
            candidates.append(filename[:-4] + ".safetensors")
        return Path(_hf_fetch(repo_id, tuple(candidates) + (filename,), spec))
    url = tag_cfg.get("url", "")
    if url:
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if cached.is_file():
            return cached
        if _hf_offline():
            raise ModelLoadError(f"could not fetch the weights of {spec}: offline (HF_HUB_OFFLINE) and not cached "
                                 f"at {cached}; pass a local checkpoint path instead")
        _probe(url, spec)
        try:
            return Path(oc.pretrained.download_pretrained_from_url(url))
        except (OSError, RuntimeError, ValueError) as error:
            raise ModelLoadError(f"could not fetch the weights of {spec} from {url}: {error}") from error
    raise ModelLoadError(f"open_clip lists no download source for {spec}")


def _hf_fetch(repo_id: str, filenames: tuple[str, ...], what: str) -> str:
    """Path of the first of `filenames` in Hub repo `repo_id`: from the cache without any
    network access, else downloaded; fails fast, without retries, when the Hub is unreachable."""
    try:
        import huggingface_hub
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as error:
        raise ModelLoadError(f"huggingface_hub is needed to fetch {what}; pip install huggingface_hub") from error
    cache_dir = _hf_cache_dir()
    for filename in filenames:
        hit = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(hit, str):
            return hit
    if _hf_offline():
        raise ModelLoadError(
            f"could not fetch the weights of {what}: HF_HUB_OFFLINE is set and {repo_id} "
            f"({' or '.join(filenames)}) is not in the Hugging Face cache {cache_dir}. Fetch it where the Hub "
            "is reachable, point HF_HOME / HF_HUB_CACHE at a cache that has it, or pass a local checkpoint "
            "path (e.g. load_clip('/path/weights.safetensors', arch='ViT-B-32', quick_gelu=...))")
    endpoint = os.environ.get("HF_ENDPOINT") or huggingface_hub.constants.ENDPOINT
    _probe(endpoint, what)
    last_error = None
    for filename in filenames:
        try:
            return huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=cache_dir)
        except LocalEntryNotFoundError as error:  # not cached and the Hub did not answer
            raise ModelLoadError(f"could not fetch the weights of {what}: {error}. Offline? Set HF_HUB_OFFLINE=1 "
                                 "and pass a local checkpoint path") from error
        except EntryNotFoundError as error:  # the repo lacks this file: try the next name
            last_error = error
        except (HfHubHTTPError, OSError, ValueError) as error:
            raise ModelLoadError(
                f"could not fetch the weights of {what} from the Hugging Face Hub ({repo_id}): {error}. "
                "Offline? Set HF_HUB_OFFLINE=1 and pass a local checkpoint path") from error
    raise ModelLoadError(f"{repo_id} has none of {list(filenames)} ({last_error})")


def _hf_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        import huggingface_hub.constants as constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _hf_cache_dir() -> str:
    """The Hub cache huggingface_hub would use, from the environment as it is now."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expandvars(os.path.expanduser(explicit))
    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = env.get("HF_HOME") or os.path.join(cache, "huggingface")
    return os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub")


def _probe(url: str, what: str) -> None:
    """One TCP connection attempt (to the proxy, if one is configured), so an offline machine
    fails in seconds instead of sitting through the Hub client's retries."""
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme or "https")
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxied = urlparse(proxy if "://" in proxy else "http://" + proxy)
        host, port = proxied.hostname, proxied.port or 80
    if not host:
        return
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as error:
        raise ModelLoadError(
            f"could not fetch the weights of {what}: {host}:{port} is unreachable ({error}). Offline? Set "
            "HF_HUB_OFFLINE=1 to use only cached weights, or pass a local checkpoint path "
            "(load_clip('/path/weights.safetensors', arch=..., quick_gelu=...))") from error


__all__ = ["LoadedCLIP", "ModelIdentity", "SOURCE_FORMATS", "load_clip", "save_clip"]
