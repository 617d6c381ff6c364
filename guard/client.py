"""Clients for a model served elsewhere that return what `guard.load(...).classify` returns.

    from guard.client import ServiceClient, triton

    with ServiceClient("http://127.0.0.1:8080") as client:   # `python -m guard serve PURIFIED`
        result = client.classify("shoe.png")                   # a Classification, equal to the library's
        results = client.classify(["a.png", "b.jpg"])          # one JSON request per batch_size images

    with triton("127.0.0.1:8001", "clip_guard") as model:     # Triton serving `python -m export.triton`'s repository
        result = model.classify("shoe.png")                    # a guard.Guard: classify, alerts included

ServiceClient sends each image as the bytes of an image file (files as they are; PIL images
and uint8 arrays as lossless PNG), so the service decodes exactly what the library decodes.

`triton` returns a `guard.Guard` whose backend is the Triton model: the image decoding,
resizing, the trigger alert's perturbed copies and its score all run here, through the
library's own code, and Triton runs only the graph on the 1 + K rows per image (K alert
perturbations; docs/serving.md says why the alert is not a Triton ensemble). The class
names, preprocessing and calibrated alert come from the clip-guard sidecar that
`export.triton` embeds in config.pbtxt, read through Triton's model-configuration API.
gRPC (port 8001) needs tritonclient[grpc], HTTP (port 8000) tritonclient[http].
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os

import numpy as np
import torch
from PIL import Image

from .backends import Backend
from .errors import InputError, MissingDependencyError, ServiceError
from .preprocess import Preprocess
from .runtime import Classification, Guard
from .sidecar import FORMAT as SIDECAR_FORMAT
from .sidecar import INPUT_NAME, OUTPUT_NAMES

log = logging.getLogger(__name__)

CLASSIFY_PATH = "/v1/classify"
# The config.pbtxt parameter that holds the model's clip-guard sidecar, as JSON (written by export.triton).
TRITON_SIDECAR_PARAMETER = "clip_guard_sidecar"
TRITON_PROTOCOLS = ("grpc", "http")
# Modes a PNG stores as they are; the library converts these others to RGB first, as the client does.
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")
_RGB_CONVERTED_MODES = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")


def encode_image(item) -> bytes:
    """The bytes sent for one image: an image file's own bytes (bytes, a path, a binary file
    object), or a lossless PNG of a PIL image, a uint8 numpy array HxW(x1|x3) or a uint8
    torch tensor CHW. Float pixels would be rounded by any 8-bit encoding: classify them
    with the library, or convert them to uint8 first."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
    elif isinstance(item, (str, os.PathLike)):
        try:
            with open(item, "rb") as file:
                data = file.read()
        except OSError as error:
            raise InputError(f"{os.fspath(item)!r} cannot be read ({error.strerror})") from error
    elif isinstance(item, Image.Image):
        data = _png_of_image(item)
    elif isinstance(item, np.ndarray):
        data = _png_of_array(item)
    elif isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] not in (1, 3):
            raise InputError(f"a torch image must be CHW with C = 1 or 3, got shape {tuple(item.shape)}")
        data = _png_of_array(item.detach().cpu().permute(1, 2, 0).numpy())
    elif isinstance(item, io.TextIOBase):
        raise InputError("the file object is open in text mode; open image files with mode 'rb'")
    elif callable(getattr(item, "read", None)):
        if callable(getattr(item, "seek", None)):
            item.seek(0)  # read from its start, as the library does
        data = item.read()
        if not isinstance(data, bytes):
            raise InputError(f"the file object gave {type(data).__name__}, not bytes; open it with mode 'rb'")
    else:
        raise InputError(f"cannot send a {type(item).__name__} as an image: pass image file bytes, a path, a binary "
                         "file object, a PIL image, or uint8 pixels (numpy HxW(x1|x3), torch CHW)")
    if not data:
        raise InputError("the image is empty (0 bytes)")
    return data


def _png_of_image(image: Image.Image) -> bytes:
    if image.mode in _RGB_CONVERTED_MODES:
        image = image.convert("RGB")
    elif image.mode not in _PNG_MODES:
        raise InputError(f"a PIL image of mode {image.mode} has no lossless 8- or 16-bit PNG form; convert it to "
                         "RGB or L first, or classify it with the library")
    buffer = io.BytesIO()
    # the EXIF orientation travels with the pixels: the service applies it as the library does
    image.save(buffer, "PNG", exif=image.getexif())
    return buffer.getvalue()


def _png_of_array(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8:
        raise InputError(f"pixels of dtype {array.dtype} would be rounded by an 8-bit PNG; send uint8 pixels "
                         "(0..255) or an image file, or classify float images with the library")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise InputError(f"a numpy image must be HxW, HxWx1 or HxWx3, got shape {array.shape}")
    return _png_of_image(Image.fromarray(np.ascontiguousarray(array)))


def _import(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(f"{module} is not installed ({error}): pip install '{extra}'") from error


# --- the guard service --------------------------------------------------------------------

class ServiceClient:
    """A client of `python -m guard serve` (thread-safe: one connection pool for all threads)."""

    def __init__(self, url: str = "http://127.0.0.1:8080", timeout: float = 60.0, batch_size: int = 64):
        httpx = _import("httpx", "clip-guard[serve]")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.url = url.rstrip("/")
        self.batch_size = batch_size  # images per request; the service's --max-images must allow it
        self._httpx = httpx
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def health(self) -> dict:
        """GET /healthz: {"status": "ready" | "loading" | "failed" | "stopped", ...}."""
        return self._request("GET", "/healthz", ok=(200, 503)).json()

    def classify(self, inputs):
        """One image -> Classification; a list or tuple -> list of Classification (see encode_image)."""
        if not isinstance(inputs, (list, tuple)):
            response = self._request("POST", CLASSIFY_PATH, content=encode_image(inputs),
                                     headers={"content-type": "application/octet-stream"})
            return Classification.from_dict(response.json())
        results = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            images = []
            for index, item in enumerate(chunk, start=start):
                try:
                    images.append(base64.b64encode(encode_image(item)).decode("ascii"))
                except InputError as error:
                    raise InputError(f"input {index}: {error}") from error
            response = self._request("POST", CLASSIFY_PATH, json={"images": images})
            results.extend(Classification.from_dict(result) for result in response.json()["results"])
        return results

    def _request(self, method: str, path: str, ok=(200,), **kwargs):
        try:
            response = self._http.request(method, path, **kwargs)
        except self._httpx.HTTPError as error:
            raise ServiceError(f"cannot reach the guard service at {self.url} ({error}); is "
                               "`python -m guard serve` running there?") from error
        if response.status_code in ok:
            return response
        try:
            message = response.json()["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        text = f"the guard service answered {response.status_code}: {message}"
        if 400 <= response.status_code < 500 and response.status_code not in (404, 405):
            raise InputError(text)  # the request was refused: a bad image, too large a body, ...
        raise ServiceError(text)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --- Triton Inference Server --------------------------------------------------------------

def _tritonclient(protocol: str):
    if protocol not in TRITON_PROTOCOLS:
        raise InputError(f"protocol must be one of {TRITON_PROTOCOLS}, got {protocol!r}")
    return _import(f"tritonclient.{protocol}", f"tritonclient[{protocol}]")


def sidecar_from_triton_config(config: dict) -> dict:
    """The clip-guard sidecar that export.triton embedded in a model's config (the JSON form of
    Triton's ModelConfig, as its HTTP API returns it and json_format.MessageToDict gives it)."""
    name = config.get("name", "the model")
    try:
        text = config["parameters"][TRITON_SIDECAR_PARAMETER]["string_value"]
    except (KeyError, TypeError) as error:
        raise InputError(f"the Triton config of {name} has no {TRITON_SIDECAR_PARAMETER!r} parameter: it was not "
                         "written by `python -m export.triton`") from error
    try:
        sidecar = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"the {TRITON_SIDECAR_PARAMETER!r} parameter of {name} is not JSON ({error})") from error
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise InputError(f"the {TRITON_SIDECAR_PARAMETER!r} parameter of {name} is not a {SIDECAR_FORMAT} sidecar")
    return sidecar


class TritonBackend(Backend):
    """A Triton model as a guard backend: `run` sends preprocessed rows [N, 3, S, S] as the graph's
    `images` input and returns its `logits` and `embedding` outputs; requests hold at most the
    config's max_batch_size rows (Guard splits larger batches)."""
    name = "triton"

    def __init__(self, url: str, model_name: str, config: dict, protocol: str = "grpc", version: str = ""):
        super().__init__(torch.device("cpu"))  # where the outputs land
        self._module = _tritonclient(protocol)
        names = [tensor.get("name") for tensor in config.get("input", [])]
        if names != [INPUT_NAME]:
            raise InputError(f"the Triton model {model_name} takes inputs {names}, not [{INPUT_NAME!r}]: it was not "
                             "written by `python -m export.triton`")
        self.url, self.model_name, self.protocol, self.version = url, model_name, protocol, version
        self.max_batch = int(config.get("max_batch_size", 0)) or None
        self.client = self._module.InferenceServerClient(url)

    def inputs(self, images: torch.Tensor) -> list:
        """The request's input tensors for preprocessed rows [N, 3, S, S]."""
        array = np.ascontiguousarray(images.detach().float().cpu().numpy())
        tensor = self._module.InferInput(INPUT_NAME, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        return [tensor]

    def _forward(self, images):
        from tritonclient.utils import InferenceServerException

        outputs = [self._module.InferRequestedOutput(name) for name in OUTPUT_NAMES]
        try:
            result = self.client.infer(self.model_name, self.inputs(images), model_version=self.version,
                                       outputs=outputs)
        except InferenceServerException as error:
            raise ServiceError(f"Triton at {self.url} failed on {self.model_name}: {error}") from error
        return tuple(torch.from_numpy(np.array(result.as_numpy(name), dtype=np.float32)) for name in OUTPUT_NAMES)

    def describe(self) -> dict:
        return {**super().describe(), "url": self.url, "model": self.model_name, "protocol": self.protocol}

    def close(self) -> None:
        self.client.close()


def triton(url: str = "127.0.0.1:8001", model_name: str = "clip_guard", protocol: str = "grpc",
           version: str = "") -> Guard:
    """A Guard that runs the model `model_name` on the Triton server at url (host:port; 8001 for
    gRPC, 8000 for HTTP by default), reading its classes, preprocessing and alert from the
    config export.triton wrote. version: "" for the server's choice (the latest)."""
    module = _tritonclient(protocol)
    from google.protobuf import json_format
    from tritonclient.utils import InferenceServerException

    client = module.InferenceServerClient(url)
    try:
        if protocol == "grpc":
            response = client.get_model_config(model_name, version)
            config = json_format.MessageToDict(response.config, preserving_proto_field_name=True)
        else:
            config = client.get_model_config(model_name, version)
    except InferenceServerException as error:
        raise ServiceError(f"Triton at {url} ({protocol}) gave no config for {model_name!r}: {error}") from error
    finally:
        client.close()
    return triton_from_config(url, model_name, config, protocol, version)


def triton_from_config(url: str, model_name: str, config: dict, protocol: str = "grpc",
                             version: str = "") -> Guard:
    """Like triton(), with the model config already in hand (e.g. config.pbtxt read from the repository)."""
    sidecar = sidecar_from_triton_config(config)
    backend = TritonBackend(url, model_name, config, protocol, version)
    log.info("Triton model %s at %s: %d classes, at most %s rows per request", model_name, url,
             len(sidecar["classes"]), backend.max_batch)
    return Guard(backend, Preprocess.from_dict(sidecar["preprocess"]), sidecar["classes"], sidecar)
