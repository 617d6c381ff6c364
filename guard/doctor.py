"""What this machine offers clip-guard: versions, accelerators, usable backends, custom kernels.

`report()` only imports packages and asks them; it never builds, compiles or downloads
anything (the custom kernels are asked with `cpp_ext.status(build=False)`). Every probe
that fails is reported, never raised: doctor is what one runs when things are broken.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import platform
import sys
from importlib import metadata

import torch

from . import __version__

# Distribution names (what pip installs) of the packages worth knowing about.
PACKAGES = ("torch", "open_clip_torch", "numpy", "pillow", "safetensors", "onnx", "onnxruntime",
            "onnxruntime-gpu", "tensorrt")
# The backends doctor knows how to check, in the order guard prefers them.
KNOWN_BACKENDS = ("torch", "onnxruntime", "aoti", "tensorrt")


def report() -> dict:
    """Everything below as one JSON-serialisable dict."""
    cuda = _cuda()
    open_clip = _open_clip()
    onnxruntime = _onnxruntime()
    tensorrt = _tensorrt()
    return {
        "clip_guard": __version__,
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch": {"version": torch.__version__, "cuda_build": torch.version.cuda,
                  "threads": torch.get_num_threads()},
        "cuda": cuda,
        "open_clip": open_clip,
        "onnxruntime": onnxruntime,
        "tensorrt": tensorrt,
        "backends": _backends(cuda, open_clip, onnxruntime, tensorrt),
        "cpp_ext": _cpp_ext(),
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _failure(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _cuda() -> dict:
    try:
        available = bool(torch.cuda.is_available())
        devices = []
        for index in range(torch.cuda.device_count() if available else 0):
            properties = torch.cuda.get_device_properties(index)
            devices.append({"index": index, "name": properties.name,
                            "compute_capability": f"{properties.major}.{properties.minor}",
                            "memory_gib": round(properties.total_memory / 2 ** 30, 1)})
        cudnn = torch.backends.cudnn.version() if available and torch.backends.cudnn.is_available() else None
        return {"available": available, "devices": devices, "cudnn": cudnn}
    except Exception as error:  # noqa: BLE001 - a broken driver is a finding, not a crash
        return {"available": False, "devices": [], "cudnn": None, "error": _failure(error)}


def _open_clip() -> dict:
    """open_clip builds the image tower of every artifact: without it the torch backend cannot load one."""
    from ._compat import import_open_clip
    try:
        module = import_open_clip()
        return {"importable": True, "version": getattr(module, "__version__", _version("open_clip_torch"))}
    except Exception as error:  # noqa: BLE001
        return {"importable": False, "error": _failure(error)}


def _onnxruntime() -> dict:
    try:
        module = importlib.import_module("onnxruntime")
        return {"importable": True, "version": getattr(module, "__version__", None),
                "providers": list(module.get_available_providers())}
    except Exception as error:  # noqa: BLE001 - missing, or its shared libraries are
        return {"importable": False, "error": _failure(error)}


def _tensorrt() -> dict:
    try:
        module = importlib.import_module("tensorrt")
        return {"importable": True, "version": getattr(module, "__version__", None)}
    except Exception as error:  # noqa: BLE001
        return {"importable": False, "error": _failure(error)}


def _runtime_backends() -> tuple | None:
    """The backend names guard.load accepts, where this version of guard says."""
    for module_name, attribute in (("guard.backends", "BACKEND_NAMES"), ("guard.runtime", "BACKENDS")):
        try:
            names = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError):
            continue
        return tuple(name for name in names if name != "auto")
    return None


def _backends(cuda: dict, open_clip: dict, onnxruntime: dict, tensorrt: dict) -> dict:
    usable = {
        "torch": (open_clip["importable"],
                  "runs artifact directories" if open_clip["importable"]
                  else f"open_clip does not import ({open_clip.get('error')})"),
        "onnxruntime": (onnxruntime["importable"],
                        f"providers: {', '.join(onnxruntime['providers'])}" if onnxruntime["importable"]
                        else "onnxruntime is not importable: pip install onnxruntime (or onnxruntime-gpu)"),
        "aoti": _aoti(),
        "tensorrt": (tensorrt["importable"] and cuda["available"],
                     "TensorRT and a CUDA GPU" if tensorrt["importable"] and cuda["available"]
                     else "tensorrt is not importable" if not tensorrt["importable"]
                     else "tensorrt imports, but there is no CUDA GPU"),
    }
    accepted = _runtime_backends()
    result = {}
    for name in dict.fromkeys(KNOWN_BACKENDS + (accepted or ())):
        ok, why = usable.get(name, (None, "doctor has no check for this backend"))
        result[name] = {"usable": ok, "why": why,
                        "accepted_by_guard_load": None if accepted is None else name in accepted}
    return result


def _aoti() -> tuple[bool, str]:
    try:
        found = importlib.util.find_spec("torch._inductor.package") is not None
    except (ImportError, ValueError):
        found = False
    return found, ("torch._inductor can load AOTInductor packages" if found
                   else "this torch has no torch._inductor.package")


def _cpp_ext() -> dict:
    """The custom kernels' own report, asked not to build: `status(build=False)`."""
    try:
        module = importlib.import_module("cpp_ext")
    except ImportError as error:
        return {"importable": False, "why": f"cpp_ext is not importable ({_failure(error)})"}
    status = getattr(module, "status", None)
    if not callable(status):
        return {"importable": True, "why": "cpp_ext has no status() function"}
    try:
        takes_build = "build" in inspect.signature(status).parameters
    except (TypeError, ValueError):
        takes_build = False
    if not takes_build:
        return {"importable": True, "why": "cpp_ext.status() has no build=False; not called, so nothing is built"}
    try:
        return {"importable": True, "status": dict(status(build=False))}
    except Exception as error:  # noqa: BLE001 - its failure is part of the report
        return {"importable": True, "why": f"cpp_ext.status(build=False) failed ({_failure(error)})"}


def format_report(data: dict) -> str:
    """The report as aligned 'key  value' lines, for people."""
    lines = [("clip-guard", data["clip_guard"]),
             ("python", f"{data['python']['version']} ({data['python']['executable']})"),
             ("platform", data["platform"])]
    for name, version in data["packages"].items():
        lines.append((name, version or "not installed"))
    torch_info, cuda = data["torch"], data["cuda"]
    lines.append(("torch CUDA build", torch_info["cuda_build"] or "none (CPU build)"))
    lines.append(("torch threads", torch_info["threads"]))
    if cuda["available"]:
        for device in cuda["devices"]:
            described = (f"{device['name']}, compute capability {device['compute_capability']}, "
                         f"{device['memory_gib']} GiB")
            lines.append((f"cuda:{device['index']}", described))
        lines.append(("cudnn", cuda["cudnn"]))
    else:
        lines.append(("CUDA", f"not available{' (' + cuda['error'] + ')' if cuda.get('error') else ''}"))
    if data["onnxruntime"]["importable"]:
        lines.append(("onnxruntime providers", ", ".join(data["onnxruntime"]["providers"])))
    for name, backend in data["backends"].items():
        state = {True: "usable", False: "not usable", None: "unknown"}[backend["usable"]]
        if backend["accepted_by_guard_load"] is False:
            state += ", not accepted by this guard.load"
        lines.append((f"backend {name}", f"{state}: {backend['why']}"))
    kernels = data["cpp_ext"]
    lines.append(("custom kernels", _describe_kernels(kernels)))
    width = max(len(key) for key, _ in lines)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in lines)


def _describe_kernels(kernels: dict) -> str:
    if "status" not in kernels:
        return kernels["why"]
    status = kernels["status"]
    if status.get("available"):
        return f"available, kernels: {', '.join(map(str, status.get('kernels') or ())) or 'none'}"
    if status.get("error"):
        return f"not available: {status['error']}"
    if status.get("attempted") is False:
        return "not loaded: doctor neither builds nor loads them (`python -m cpp_ext build` does)"
    return "not available"
