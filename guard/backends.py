"""The engines behind `Guard`: one interface, four implementations.

    torch        an artifact directory, run eagerly in its folded serving form
    onnxruntime  a `.onnx` graph from `python -m export.onnx`, with explicit providers
    aoti         a `.pt2` AOTInductor package from `python -m export.aoti`
    tensorrt     a `.engine` from `python -m export.trt` (needs TensorRT and a GPU)

Each takes a batch of preprocessed images (float32 [N, 3, S, S]) and returns the
float32 logits [N, C] and image embeddings [N, E] on the CPU, through one signature,
`Backend.run(images, frozen_rows=0, class_token=False)`. Only the torch backend serves
the tower's internals (the frozen-tower rows, the class token); compiled backends refuse
them with an InputError. Optional packages (onnxruntime, tensorrt) are imported only when
their backend is used.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import torch

from .errors import InputError, MissingDependencyError, ModelLoadError
from .folded import fused_attention_available
from .sidecar import INPUT_NAME, OUTPUT_NAMES

BACKEND_NAMES = ("torch", "onnxruntime", "aoti", "tensorrt")


class Backend:
    """Runs the compiled or eager forward pass. Subclasses set `name` and implement `_forward`
    (and, where they serve the tower's internals, `_forward_internals`); callers use `run`."""
    name = "backend"
    max_batch: Optional[int] = None  # the largest batch one run accepts; None: any
    # the frozen-tower view and the class token: compiled graphs have the prompts folded into
    # every row and return only the logits and the embedding
    serves_tower_internals = False

    def __init__(self, device: torch.device):
        self.device = device

    def run(self, images: torch.Tensor, frozen_rows: int = 0, class_token: bool = False) -> tuple[torch.Tensor, ...]:
        """(logits [N, C], embedding [N, E]) of preprocessed images, float32 on the CPU; with
        class_token also the last block's class tokens [N, D]. The last `frozen_rows` rows run
        through the frozen tower (the prompts off). Both need `serves_tower_internals`."""
        if isinstance(frozen_rows, bool) or not isinstance(frozen_rows, int) or not 0 <= frozen_rows <= len(images):
            raise InputError(f"frozen_rows must be an integer in [0, {len(images)}], got {frozen_rows!r}")
        if not frozen_rows and not class_token:
            return self._forward(images)
        self.check_internals()
        return self._forward_internals(images, frozen_rows, class_token)

    def check_internals(self) -> None:
        """InputError unless this backend serves the tower's internals."""
        if not self.serves_tower_internals:
            raise InputError(f"the frozen-tower view, the class token and fitted alerts need the artifact directory "
                             f"on the torch backend; the {self.name} model has its prompts folded in and returns "
                             "logits and embeddings only")

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _forward_internals(self, images: torch.Tensor, frozen_rows: int, class_token: bool) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def describe(self) -> dict:
        """What is running, for logs and `python -m guard inspect`."""
        return {"backend": self.name, "device": str(self.device)}

    def close(self) -> None:
        """Release the engine. The default keeps nothing beyond Python references."""


def _outputs_to_cpu(*outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(output.float().cpu() for output in outputs)


class TorchBackend(Backend):
    """A PromptedCLIP or its folded form (what guard.load builds from an artifact): both
    return (logits, embedding), run `frozen_rows` last rows through the frozen tower and,
    with class_token, also return the last block's class token (the feature density's input)."""
    name = "torch"
    serves_tower_internals = True

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__(device)
        self.model = model

    def _forward(self, images):
        return self._forward_internals(images, 0, False)

    def _forward_internals(self, images, frozen_rows, class_token):
        with torch.inference_mode():
            return _outputs_to_cpu(*self.model(images.to(self.device), frozen_rows, class_token))

    def describe(self) -> dict:
        return {**super().describe(), "fused_attention": bool(getattr(self.model, "fused", False))}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise MissingDependencyError("the onnxruntime backend needs onnxruntime: pip install "
                                     "'clip-guard[onnxruntime]' (or '[onnxruntime-gpu]' for CUDA)") from error
    return onnxruntime


class OnnxRuntimeBackend(Backend):
    """An ONNX graph in an onnxruntime session on exactly one requested provider.

    onnxruntime falls back to the CPU when a CUDA provider cannot start; here that is
    an error, since a silently slower (or differently rounded) model is a bug."""
    name = "onnxruntime"

    def __init__(self, path: Path, device: torch.device, precision: str = "fp32", threads: Optional[int] = None,
                 spinning: bool = True):
        super().__init__(device)
        ort = _import_onnxruntime()
        if device.type == "cpu":
            provider, options = "CPUExecutionProvider", {}
        elif device.type == "cuda":
            provider, options = "CUDAExecutionProvider", {"device_id": device.index or 0}
        else:
            raise ModelLoadError(f"the onnxruntime backend runs on cpu or cuda, not {device}")
        available = ort.get_available_providers()
        if provider not in available:
            raise ModelLoadError(f"onnxruntime {ort.__version__} here offers {available}, not {provider}; "
                                 "for CUDA install 'clip-guard[onnxruntime-gpu]' instead of onnxruntime")
        session_options = ort.SessionOptions()
        # onnxruntime 1.31's layout optimisations (ORT_ENABLE_ALL) crash the process on some
        # float16 graphs (measured: the 64-wide test tower); extended fusions are safe there.
        level = "ORT_ENABLE_EXTENDED" if precision == "fp16" else "ORT_ENABLE_ALL"
        session_options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        if threads is not None:
            session_options.intra_op_num_threads = threads
        if not spinning:
            # Idle worker threads otherwise spin for a while after each run: right for one model
            # on its own cores, but they take the cores from other sessions that run next.
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), session_options, providers=[(provider, options)])
        except Exception as error:  # onnxruntime raises its own untyped exceptions
            raise ModelLoadError(f"onnxruntime cannot load {path}: {error}") from error
        active = self.session.get_providers()
        if active[0] != provider:
            raise ModelLoadError(f"onnxruntime started {active[0]} instead of {provider} for {path}")
        self.provider = provider
        names = [output.name for output in self.session.get_outputs()]
        if names[:len(OUTPUT_NAMES)] != list(OUTPUT_NAMES):
            raise ModelLoadError(f"{path} has outputs {names}; expected {list(OUTPUT_NAMES)} first "
                                 "(export it with `python -m export.onnx`)")

    def _forward(self, images):
        logits, embedding = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.float().cpu().numpy()})
        return torch.from_numpy(logits).float(), torch.from_numpy(embedding).float()

    def describe(self) -> dict:
        return {**super().describe(), "provider": self.provider}

    def close(self) -> None:
        self.session = None


class AOTIBackend(Backend):
    """An AOTInductor package compiled by `python -m export.aoti` for this device type."""
    name = "aoti"

    def __init__(self, path: Path, device: torch.device, details: dict):
        super().__init__(device)
        compiled_for = details["device"]
        self.max_batch = int(details["max_batch"])
        if device.type != compiled_for:
            raise ModelLoadError(f"{path} was compiled for {compiled_for}, not {device.type}: re-run "
                                 f"`python -m export.aoti ARTIFACT --out {path.name} --device {device.type}`")
        self.fused_attention = bool(details.get("fused_attention", False))
        if self.fused_attention and not fused_attention_available():
            # The package calls clip_guard::prompt_attention through the dispatcher: the op must be loaded.
            raise MissingDependencyError(f"{path} was compiled with the clip_guard C++ operator, which is not built "
                                         "here: run `python -m cpp_ext build`, or re-export with "
                                         "`python -m export.aoti ARTIFACT --out ... --no-fused`")
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
        except Exception as error:  # the loader raises RuntimeError or C++ errors alike
            raise ModelLoadError(f"cannot load the AOTInductor package {path}: {error}") from error
        # The compiled model's runner holds per-call buffers: one call at a time.
        self._lock = threading.Lock()

    def _forward(self, images):
        with self._lock, torch.inference_mode():
            return _outputs_to_cpu(*self.runner(images.float().to(self.device)))

    def describe(self) -> dict:
        return {**super().describe(), "fused_attention": self.fused_attention}

    def close(self) -> None:
        self.runner = None


class TensorRTBackend(Backend):
    """A serialized TensorRT 10 engine, run with the tensor-name API on a torch CUDA stream."""
    name = "tensorrt"

    def __init__(self, path: Path, device: torch.device, sidecar: dict):
        super().__init__(device)
        trt = import_tensorrt()
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ModelLoadError("the tensorrt backend needs a CUDA GPU; none is available here")
        check_engine_compatible(sidecar["tensorrt"], trt.__version__, torch.cuda.get_device_capability(device),
                                rebuild_command(sidecar, path))
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ModelLoadError(f"TensorRT could not deserialize {path}: {rebuild_command(sidecar, path)}")
        self.context = self.engine.create_execution_context()
        self.max_batch = int(sidecar["tensorrt"]["profile"]["max"])
        self._lock = threading.Lock()  # an execution context serves one call at a time

    def _forward(self, images):
        with self._lock, torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            images = images.float().to(self.device).contiguous()
            self.context.set_input_shape(INPUT_NAME, tuple(images.shape))
            self.context.set_tensor_address(INPUT_NAME, images.data_ptr())
            outputs = {}
            for name in OUTPUT_NAMES:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT failed to run the engine")
            stream.synchronize()
            return _outputs_to_cpu(outputs["logits"], outputs["embedding"])

    def close(self) -> None:
        self.context = None
        self.engine = None


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as error:
        raise MissingDependencyError("TensorRT is not installed: pip install 'clip-guard[tensorrt]' on a "
                                     "machine with an NVIDIA GPU (TensorRT 10 or later)") from error
    return tensorrt


def rebuild_command(sidecar: dict, engine_path: Path) -> str:
    """The command that rebuilds this engine on the current machine."""
    details = sidecar["tensorrt"]
    profile = details["profile"]
    precision = " --fp16" if sidecar["precision"] == "fp16" else ""
    return (f"rebuild it here with `python -m export.trt {details['onnx']} --out {engine_path}{precision} "
            f"--batch {profile['min']}:{profile['opt']}:{profile['max']}`")


def check_engine_compatible(details: dict, trt_version: str, capability: tuple[int, int], rebuild: str) -> None:
    """TensorRT engines only run under the TensorRT version and GPU architecture that built them."""
    built_capability = tuple(details["compute_capability"])
    if details["tensorrt_version"] != trt_version:
        raise ModelLoadError(f"the engine was built with TensorRT {details['tensorrt_version']}, this machine "
                             f"has {trt_version}: {rebuild}")
    if built_capability != tuple(capability):
        raise ModelLoadError(f"the engine was built for GPU compute capability "
                             f"{'.'.join(map(str, built_capability))}, this GPU is "
                             f"{'.'.join(map(str, capability))}: {rebuild}")
