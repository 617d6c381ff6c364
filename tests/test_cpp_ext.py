"""The clip_guard C++/CUDA operators (cpp_ext) against the pure-torch references.

Tests that need the built extension skip with the build error as the reason, or fail
when CLIP_GUARD_REQUIRE_EXT=1. CUDA tests run only where a GPU is visible.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CFG
from torch import nn

import cpp_ext
import guard.folded
import guard.prompted
from guard._compat import import_open_clip
from guard.folded import attend_with_prompts, fold
from guard.prompted import PromptedCLIP, PromptedVisionEncoder

REPO = Path(__file__).resolve().parents[1]
REQUIRE_EXT = os.environ.get("CLIP_GUARD_REQUIRE_EXT") == "1"
HAS_CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Output tolerances against a float64 reference: a few units in the last place of each dtype.
TOLERANCES = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-6, rtol=1e-5),
              torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
# (batch N, heads H, queries T, head width d, prompts b, image keys if not T)
ATTENTION_SHAPES = [
    (2, 3, 7, 16, 5, None),
    (1, 2, 13, 33, 1, None),   # batch 1, one prompt token, T and d not multiples of 8
    (3, 1, 1, 8, 2, None),     # a single query
    (2, 2, 9, 20, 3, 4),       # fewer keys than queries
    (5, 12, 50, 64, 50, None),  # ViT-B/32
]


def _extension_reason() -> str:
    return f"clip_guard C++ extension unavailable: {cpp_ext.status(build=False)['error_summary']}"


@pytest.fixture(scope="module")
def ext():
    """The built extension; skips (or fails under CLIP_GUARD_REQUIRE_EXT=1) when it did not build."""
    if not cpp_ext.load():
        if REQUIRE_EXT:
            pytest.fail(_extension_reason())
        pytest.skip(_extension_reason())


@pytest.fixture(scope="module")
def cuda_ext(ext):
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    if "cuda" not in cpp_ext.status()["kernels"]:
        reason = f"the CUDA kernels were not built: {cpp_ext.status()['cuda_note']}"
        if REQUIRE_EXT:
            pytest.fail(reason)
        pytest.skip(reason)


def attention_inputs(shape, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    batch, heads, queries, width, prompts, keys = shape
    generator = torch.Generator().manual_seed(seed)

    def make(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype) \
            .requires_grad_(requires_grad)

    keys = keys or queries
    return (make(batch, heads, queries, width), make(batch, heads, keys, width), make(batch, heads, keys, width),
            make(heads, prompts, width), make(heads, prompts, width))


def reference_attention(*inputs) -> torch.Tensor:
    return attend_with_prompts(*(x.detach().double() for x in inputs))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (the extension's state is per process)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=300)


# --- building and reporting -------------------------------------------------------------

def test_import_builds_nothing(tmp_path):
    result = run_python("import json, cpp_ext; print(json.dumps(cpp_ext.status(build=False)))",
                        TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["attempted"] is False and report["available"] is False and report["kernels"] == []
    assert list(tmp_path.iterdir()) == []


def test_failed_build_is_recorded_and_the_wrappers_say_how_to_build(tmp_path):
    code = """
import json, sys, torch, cpp_ext
available = cpp_ext.is_available()
try:
    cpp_ext.prompt_attention(*(torch.zeros(1, 1, 2, 4) for _ in range(3)), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
    message = None
except cpp_ext.ExtensionUnavailableError as error:
    assert isinstance(error, ImportError)
    message = str(error)
print(json.dumps({"available": available, "message": message, "status": cpp_ext.status(),
                  "guard_imported": "guard" in sys.modules}))
"""
    result = run_python(code, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["available"] is False
    assert report["status"]["attempted"] is True and report["status"]["kernels"] == []
    assert "no-such-compiler" in report["status"]["error"]
    assert "no-such-compiler" in report["status"]["error_summary"] and "no-such-compiler" in report["message"]
    assert "python -m cpp_ext build" in report["message"]
    assert report["guard_imported"] is False  # cpp_ext stands alone


def test_guard_translates_an_unbuilt_extension_into_its_typed_error(tmp_path):
    """Serving only loads a cached build: with none, fold(fused=True) raises guard's
    MissingDependencyError carrying cpp_ext's reason, and builds nothing."""
    code = """
import json, torch
from guard.errors import MissingDependencyError
from guard.folded import fold, fused_attention_available
from guard.prompted import PromptedCLIP
try:
    fold(PromptedCLIP.__new__(PromptedCLIP), fused=True)
    message = None
except MissingDependencyError as error:
    message = str(error)
print(json.dumps({"available": fused_attention_available(), "message": message}))
"""
    result = run_python(code, TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["available"] is False
    assert "fused=True needs the clip_guard C++ operator" in report["message"]
    assert "no build is cached" in report["message"] and "python -m cpp_ext build" in report["message"]
    assert list(tmp_path.iterdir()) == []


def test_command_line_keeps_the_shared_exit_codes_without_guard(tmp_path):
    """python -m cpp_ext answers as guard.console's entry points do (an unavailable extension:
    3 and one `error:` line; bad arguments: 2) and never imports guard."""
    code = """
import json, sys
from cpp_ext.__main__ import run
code = run(sys.argv[1:])
print(json.dumps({"code": code, "guard_imported": "guard" in sys.modules}))
"""
    outcomes = {}
    for command in ("status", "no-such-command"):
        environment = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_EXTENSIONS_DIR": str(tmp_path / command),
                       "CXX": str(tmp_path / "no-such-compiler")}
        result = subprocess.run([sys.executable, "-c", code, command], check=False, cwd=REPO, env=environment,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        *report, last = result.stdout.strip().splitlines()
        outcomes[command] = (json.loads(last), report, result.stderr.strip().splitlines())
    ending, report, stderr = outcomes["status"]
    assert ending == {"code": 3, "guard_imported": False}
    assert json.loads("\n".join(report))["available"] is False  # the JSON report still comes on stdout
    assert stderr[-1].startswith("error: the clip_guard C++ extension is not available")
    assert "no-such-compiler" in stderr[-1] and "python -m cpp_ext build" in stderr[-1]
    assert outcomes["no-such-command"][0] == {"code": 2, "guard_imported": False}


def test_a_failed_cuda_build_falls_back_to_the_cpu_kernels(monkeypatch):
    """Simulated (no CUDA toolchain here): the CUDA build fails, the CPU-only build then loads."""
    from cpp_ext import _build, _registrations
    attempts = []

    def compile_and_load(with_cuda: bool, verbose: bool):
        attempts.append(with_cuda)
        return "RuntimeError: nvcc fatal : Unsupported gpu architecture 'compute_120'" if with_cuda else None

    monkeypatch.setattr(_build, "_STATE", _build._State())
    monkeypatch.setattr(_build, "cuda_build_possible", lambda: (True, None))
    monkeypatch.setattr(_build, "_compile_and_load", compile_and_load)
    monkeypatch.setattr(_registrations, "register", lambda: None)
    assert _build.load() is True
    assert attempts == [True, False]
    assert "Unsupported gpu architecture" in _build.status(build=False)["cuda_note"]
    assert _build.status(build=False)["error"] is None


def test_build_directory_is_keyed_by_torch_version(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = cpp_ext.build_directory(with_cuda=False)
    assert directory.parent == tmp_path / "clip_guard_cpp_ext"
    assert torch.__version__ in directory.name


def test_status_reports_the_registered_kernels(ext):
    report = cpp_ext.status()
    assert report["available"] is True and report["error"] is None
    assert "cpu" in report["kernels"]
    assert ("cuda" in report["kernels"]) == (HAS_CUDA and report["cuda_note"] is None)
    json.dumps(report)  # an environment report must serialise


def test_nvcc_compiles_the_cuda_kernels_for_sm80_and_sm90(tmp_path):
    if cpp_ext.find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    result = cpp_ext.compile_cuda_kernels(tmp_path, architectures=("sm_80", "sm_90"))
    assert result.ok, result.log
    assert result.compiled == {"sm_80": True, "sm_90": True}
    assert result.c_symbols_found and Path(result.library).is_file()
    assert result.registration_compiled is True, result.log


# --- prompt_attention -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_prompt_attention_matches_reference(ext, shape, dtype):
    inputs = attention_inputs(shape, dtype)
    out = cpp_ext.prompt_attention(*inputs)
    assert out.dtype == dtype and out.shape == inputs[0].shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), reference_attention(*inputs), **TOLERANCES[dtype])


def test_prompt_attention_takes_strided_inputs(ext):
    """q, k, v as FoldedBlock makes them: views of one fused qkv projection."""
    batch, tokens, heads, width = 3, 11, 4, 12
    qkv = torch.randn(batch, tokens, 3, heads, width)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    prompt_k = torch.randn(heads, width, 6).transpose(1, 2)  # non-contiguous too
    prompt_v = torch.randn(heads, 6, width)
    assert not q.is_contiguous() and not prompt_k.is_contiguous()
    torch.testing.assert_close(cpp_ext.prompt_attention(q, k, v, prompt_k, prompt_v).double(),
                               reference_attention(q, k, v, prompt_k, prompt_v), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES[:4], ids=str)
def test_prompt_attention_gradients_match_reference(ext, shape, dtype):
    inputs = attention_inputs(shape, dtype, requires_grad=True)
    reference_inputs = [x.detach().double().requires_grad_() for x in inputs]
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cpp_ext.prompt_attention(*inputs).backward(grad.to(dtype))
    attend_with_prompts(*reference_inputs).backward(grad)
    tolerance = TOLERANCES[dtype] if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-4)
    for name, x, reference in zip(("q", "k", "v", "prompt_k", "prompt_v"), inputs, reference_inputs, strict=False):
        assert x.grad.dtype == dtype and x.grad.shape == x.shape, name
        # the prompt gradients sum over the batch, so they are larger: scale the tolerance with them
        scale = max(1.0, reference.grad.abs().max().item())
        torch.testing.assert_close(x.grad.double(), reference.grad, atol=tolerance["atol"] * scale,
                                   rtol=tolerance["rtol"], msg=lambda m, name=name: f"grad {name}: {m}")


def test_prompt_attention_only_computes_the_requested_gradients(ext):
    q, k, v, prompt_k, prompt_v = attention_inputs(ATTENTION_SHAPES[0])
    prompt_k.requires_grad_()
    cpp_ext.prompt_attention(q, k, v, prompt_k, prompt_v).sum().backward()
    assert prompt_k.grad is not None and q.grad is None and prompt_v.grad is None


def test_prompt_attention_records_no_autograd_history_in_its_threads(ext):
    """The CPU kernel shares the batch out over threads; none may record history of its own."""
    inputs = attention_inputs((2 * torch.get_num_threads() + 1, 2, 5, 8, 3, None), requires_grad=True)
    with torch.no_grad():
        assert not cpp_ext.prompt_attention(*inputs).requires_grad
    assert "clip_guard_prompt_attention" in type(cpp_ext.prompt_attention(*inputs).grad_fn).__name__


def test_prompt_attention_gradcheck(ext):
    inputs = attention_inputs((2, 2, 5, 6, 3, 4), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cpp_ext.prompt_attention, inputs)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_prompt_attention_opcheck(ext, requires_grad):
    inputs = attention_inputs((2, 3, 5, 8, 3, None), requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.clip_guard.prompt_attention.default, inputs)
    grad = torch.randn(2, 3, 5, 8)
    torch.library.opcheck(torch.ops.clip_guard.prompt_attention_backward.default,
                          (grad, *(x.detach() for x in inputs)))


def _attention_case(**changes):
    shapes = dict(q=(2, 3, 5, 8), k=(2, 3, 5, 8), v=(2, 3, 5, 8), prompt_k=(3, 4, 8), prompt_v=(3, 4, 8))
    dtypes = {name: torch.float32 for name in shapes}
    for name, change in changes.items():
        if isinstance(change, torch.dtype):
            dtypes[name] = change
        else:
            shapes[name] = change
    return [torch.randn(shapes[name]).to(dtypes[name]) for name in ("q", "k", "v", "prompt_k", "prompt_v")]


@pytest.mark.parametrize("inputs, message", [
    (_attention_case(q=(2, 3, 8)), "must be 4-D"),
    (_attention_case(prompt_k=(4, 8), prompt_v=(4, 8)), "must be 3-D"),
    (_attention_case(v=(2, 3, 6, 8)), "k and v must have the same shape"),
    (_attention_case(k=(2, 3, 5, 4), v=(2, 3, 5, 4)), "must match q in batch, heads and head width"),
    (_attention_case(k=(1, 3, 5, 8), v=(1, 3, 5, 8)), "must match q in batch, heads and head width"),
    (_attention_case(prompt_v=(3, 5, 8)), "prompt_k and prompt_v must have the same shape"),
    (_attention_case(prompt_k=(2, 4, 8), prompt_v=(2, 4, 8)), "prompt_k has 2 heads but q has 3"),
    (_attention_case(prompt_k=(3, 4, 6), prompt_v=(3, 4, 6)), "prompt_k has head width 6 but q has 8"),
    (_attention_case(prompt_k=(3, 0, 8), prompt_v=(3, 0, 8)), "at least one image key and one prompt token"),
    (_attention_case(prompt_k=torch.float16), "all inputs must have one dtype"),
    (_attention_case(**{name: torch.int64 for name in ("q", "k", "v", "prompt_k", "prompt_v")}), "supports float32"),
], ids=lambda value: value if isinstance(value, str) else "")
def test_prompt_attention_rejects_bad_inputs(ext, inputs, message):
    with pytest.raises(RuntimeError, match=message):
        cpp_ext.prompt_attention(*inputs)


def test_prompt_attention_rejects_inputs_on_two_devices(ext):
    q, k, v, prompt_k, prompt_v = _attention_case()
    with pytest.raises(RuntimeError, match="one device"):
        cpp_ext.prompt_attention(q, k, v, prompt_k.to("meta"), prompt_v)


# --- insert_prompts ---------------------------------------------------------------------

INSERT_SHAPES = [(2, 5, 8, 3), (1, 1, 7, 1), (3, 50, 33, 50), (4, 3, 5, 0)]  # (N, 1+T, D, b)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64, torch.int64), ids=str)
@pytest.mark.parametrize("shape", INSERT_SHAPES, ids=str)
def test_insert_prompts_matches_reference(ext, shape, dtype):
    batch, length, width, count = shape
    tokens = (torch.randn(batch, length, width) * 100).to(dtype)
    prompts = (torch.randn(count, width) * 100).to(dtype)
    out = cpp_ext.insert_prompts(tokens, prompts)
    assert out.dtype == dtype
    assert torch.equal(out, guard.prompted.insert_prompts(tokens, prompts))


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_insert_prompts_gradients(ext, dtype):
    tokens = torch.randn(3, 6, 10, dtype=dtype, requires_grad=True)
    prompts = torch.randn(4, 10, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 10, 10, dtype=dtype)
    cpp_ext.insert_prompts(tokens, prompts).backward(grad)
    reference_tokens = tokens.detach().double().requires_grad_()
    reference_prompts = prompts.detach().double().requires_grad_()
    guard.prompted.insert_prompts(reference_tokens, reference_prompts).backward(grad.double())
    assert tokens.grad.dtype == dtype and prompts.grad.dtype == dtype
    torch.testing.assert_close(tokens.grad.double(), reference_tokens.grad, atol=0, rtol=0)
    torch.testing.assert_close(prompts.grad.double(), reference_prompts.grad, **TOLERANCES[dtype])


def test_insert_prompts_gradcheck(ext):
    tokens = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    prompts = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cpp_ext.insert_prompts, (tokens, prompts))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_insert_prompts_opcheck(ext, requires_grad):
    tokens = torch.randn(2, 5, 8, requires_grad=requires_grad)
    prompts = torch.randn(3, 8, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.clip_guard.insert_prompts.default, (tokens, prompts))


@pytest.mark.parametrize("tokens, prompts, message", [
    (torch.zeros(2, 8), torch.zeros(3, 8), "tokens must be 3-D"),
    (torch.zeros(2, 5, 8), torch.zeros(1, 3, 8), "prompts must be 2-D"),
    (torch.zeros(2, 0, 8), torch.zeros(3, 8), "need a class token"),
    (torch.zeros(2, 5, 8), torch.zeros(3, 7), "prompts have width 7 but tokens have width 8"),
    (torch.zeros(2, 5, 8), torch.zeros(3, 8, dtype=torch.float16), "one dtype"),
    (torch.zeros(2, 5, 8), torch.zeros(3, 8, device="meta"), "one device"),
], ids=lambda value: value if isinstance(value, str) else "")
def test_insert_prompts_rejects_bad_inputs(ext, tokens, prompts, message):
    with pytest.raises(RuntimeError, match=message):
        cpp_ext.insert_prompts(tokens, prompts)


# --- tracing, export, and the models ------------------------------------------------------

class PromptedAttention(nn.Module):
    """A block's worth of both operators around constant prompt keys and values."""

    def __init__(self, heads: int = 2, width: int = 8, prompts: int = 3):
        super().__init__()
        self.register_buffer("prompt_k", torch.randn(heads, prompts, width))
        self.register_buffer("prompt_v", torch.randn(heads, prompts, width))
        self.prompt_tokens = nn.Parameter(torch.randn(prompts, heads * width))

    def forward(self, q, k, v, tokens):
        mixed = cpp_ext.prompt_attention(q, k, v, self.prompt_k, self.prompt_v)
        return mixed, cpp_ext.insert_prompts(tokens, self.prompt_tokens)


def _module_inputs(batch: int):
    q, k, v, _, _ = attention_inputs((batch, 2, 5, 8, 3, None))
    return q, k, v, torch.randn(batch, 6, 16)


def test_torch_export_keeps_the_operators(ext):
    module = PromptedAttention().eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(module, _module_inputs(2),
                                  dynamic_shapes=({0: batch}, {0: batch}, {0: batch}, {0: batch}))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"clip_guard.prompt_attention.default", "clip_guard.insert_prompts.default"} <= targets
    inputs = _module_inputs(5)  # another batch size than the one traced
    for exported, eager in zip(program.module()(*inputs), module(*inputs), strict=False):
        torch.testing.assert_close(exported, eager)


def test_torch_compile_traces_forward_and_backward(ext):
    module = PromptedAttention()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    q, k, v, tokens = _module_inputs(3)
    q.requires_grad_()
    mixed, inserted = compiled(q, k, v, tokens)
    (mixed.sum() + inserted.sum()).backward()
    eager_q = q.detach().requires_grad_()
    eager_mixed, eager_inserted = module(eager_q, k, v, tokens)
    eager_mixed.sum().backward()
    torch.testing.assert_close(mixed, eager_mixed)
    torch.testing.assert_close(inserted, eager_inserted)
    torch.testing.assert_close(q.grad, eager_q.grad)
    assert module.prompt_tokens.grad is not None


def _tiny_prompted_clip() -> PromptedCLIP:
    open_clip = import_open_clip()
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**copy.deepcopy(TINY_CFG)).eval()
    encoder = PromptedVisionEncoder(clip.visual)
    prompts = encoder.new_prompts(1, 4)
    with torch.no_grad():
        prompts.tokens.normal_(0, 1)
    return PromptedCLIP(encoder, torch.randn(5, TINY_CFG["embed_dim"]), 30.0, prompts).eval()


def test_operators_are_drop_in_replacements_in_the_prompted_models(ext, monkeypatch):
    model = _tiny_prompted_clip()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    literal_logits, _ = model(images)
    literal_logits.sum().backward()
    literal_grad = model.prompts.tokens.grad.clone()
    with torch.no_grad():
        folded_logits, _ = fold(model)(images)

    model.prompts.tokens.grad = None
    monkeypatch.setattr(guard.prompted, "insert_prompts", cpp_ext.insert_prompts)
    monkeypatch.setattr(guard.folded, "attend_with_prompts", cpp_ext.prompt_attention)
    logits, _ = model(images)
    logits.sum().backward()
    torch.testing.assert_close(logits, literal_logits)
    torch.testing.assert_close(model.prompts.tokens.grad, literal_grad)
    with torch.no_grad():
        torch.testing.assert_close(fold(model)(images)[0], folded_logits, atol=1e-4, rtol=1e-4)


# --- wiring into export and serving -------------------------------------------------------

def test_custom_attention_reference_kernel_is_the_folded_attention():
    from export.custom_attention import reference_kernel
    q, k, v, prompt_k, prompt_v = attention_inputs((3, 2, 9, 16, 4, None), dtype=torch.float64)
    expected = attend_with_prompts(q, k, v, prompt_k, prompt_v)
    got = reference_kernel(*(t.numpy() for t in (q, k, v, prompt_k, prompt_v)))
    torch.testing.assert_close(torch.from_numpy(got), expected)


def test_onnx_custom_attention_graph_has_one_node_per_prompted_block(ext, tiny_artifact, tmp_path, capsys):
    pytest.importorskip("onnx", reason="the onnxruntime extra is not installed")
    import onnx

    import guard
    from export.common import TOLERANCES
    from guard import console
    from export.custom_attention import DOMAIN, count_nodes, run_reference
    from export.onnx import export_onnx
    from export.trt import main as trt_main
    from guard.errors import ArtifactError, InputError
    from guard.inputs import prepare_batch
    from guard.sidecar import read_sidecar

    out = tmp_path / "custom.onnx"
    export_onnx(tiny_artifact.path, out, attention="custom")
    prompted_blocks = TINY_CFG["vision_cfg"]["layers"] - 1  # the tiny artifact prompts from block 1
    assert count_nodes(out) == prompted_blocks
    assert {entry.domain: entry.version for entry in onnx.load(str(out)).opset_import}[DOMAIN] == 1
    sidecar = read_sidecar(out, "onnx")
    assert sidecar["onnx"]["attention"] == "custom" and sidecar["onnx"]["validation"]["top1_agreement"] == 1.0

    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    batch = prepare_batch(images, tiny_artifact.preprocess)
    with guard.load(tiny_artifact.path, device="cpu") as model:
        expected_logits, expected_embedding = model.forward(batch)
    logits, embedding = run_reference(out, batch)
    assert float((logits - expected_logits).abs().max()) / tiny_artifact.logit_scale <= TOLERANCES["fp32"]
    torch.testing.assert_close(embedding, expected_embedding, atol=1e-4, rtol=1e-4)

    with pytest.raises(ArtifactError, match="TensorRT plugin"):
        guard.load(out, device="cpu")
    code = console.run(trt_main, [str(out), "--out", str(tmp_path / "x.engine")])
    assert code == 2 and "plugin that clip-guard does not build" in capsys.readouterr().err
    for kwargs in ({"precision": "fp16"}, {"form": "literal"}, {"attention": "plugin"}):
        with pytest.raises(InputError):
            export_onnx(tiny_artifact.path, tmp_path / "bad.onnx", **{"attention": "custom", **kwargs})
    export_onnx(tiny_artifact.path, tmp_path / "standard.onnx")
    assert count_nodes(tmp_path / "standard.onnx") == 0

    def softmaxes(path):
        return sum(node.op_type == "Softmax" for node in onnx.load(str(path)).graph.node)
    # the prompted blocks' softmax moved into the custom nodes; the unprompted block keeps its own
    assert softmaxes(out) == softmaxes(tmp_path / "standard.onnx") - prompted_blocks == 1


def test_aoti_package_calls_the_operator_and_needs_it_to_load(ext, tiny_artifact, tmp_path, monkeypatch):
    import guard
    import guard.backends
    from export.aoti import export_aoti
    from guard.errors import MissingDependencyError
    from guard.sidecar import read_sidecar

    out = tmp_path / "fused.pt2"
    export_aoti(tiny_artifact.path, out, max_batch=8, validation_count=4)  # fused by default where built
    assert read_sidecar(out, "aoti")["aoti"]["fused_attention"] is True
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with guard.load(tiny_artifact.path, device="cpu") as reference, guard.load(out, device="cpu") as model:
        assert model.backend_info["fused_attention"] is True
        torch.testing.assert_close(model.logits(images), reference.logits(images), atol=1e-4, rtol=1e-5)
    monkeypatch.setattr(guard.backends, "fused_attention_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="cpp_ext build"):
        guard.load(out, device="cpu")


# --- the benchmark ------------------------------------------------------------------------

def test_benchmark_default_on_rule():
    from benchmarks.prompt_attention import Comparison, default_on
    fast = [Comparison("cpu", batch, 2.0, 3.0, 2.0) for batch in (1, 32, 256)]
    slow_at_32 = [Comparison("cpu", 32, 0.99, 3.0, 0.99), Comparison("cpu", 256, 1.5, 3.0, 1.5)]
    slow_at_1 = [Comparison("cpu", 1, 0.5, 1.0, 0.5)] + fast[1:]
    assert default_on(fast) == {"cpu": True}
    assert default_on(slow_at_32) == {"cpu": False}
    assert default_on(slow_at_1) == {"cpu": True}  # batch 1 does not count
    assert default_on(fast[:2]) == {"cpu": None}  # batch 256 not measured: no decision


def test_benchmark_runs_and_updates_a_document(ext, tmp_path):
    from benchmarks.prompt_attention import DOC_END, DOC_START, main
    document = tmp_path / "doc.md"
    document.write_text(f"before\n{DOC_START}\nold table\n{DOC_END}\nafter\n")
    assert main(["--batches", "1,2", "--repeats", "2", "--devices", "cpu", "--out", str(tmp_path),
                 "--update-doc", str(document)]) == 0
    report = json.loads((tmp_path / "prompt_attention.json").read_text())
    assert {m["method"] for m in report["measurements"]} == {"fused", "folded", "literal"}
    assert report["default_on"] == {"cpu": None}
    text = document.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old table" not in text
    assert "| cpu | 2 |" in text


# --- CUDA ---------------------------------------------------------------------------------

CUDA_ATTENTION_SHAPES = ATTENTION_SHAPES + [
    (2, 3, 40, 96, 7, None),   # three columns per lane
    (2, 2, 33, 128, 40, None),  # the widest head the kernel takes, keys spanning several tiles
    (1, 2, 17, 160, 5, None),  # wider: the composite fallback
]


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("shape", CUDA_ATTENTION_SHAPES, ids=str)
def test_cuda_prompt_attention_matches_reference(cuda_ext, shape, dtype):
    inputs = attention_inputs(shape, dtype, device="cuda")
    out = cpp_ext.prompt_attention(*inputs)
    assert out.device.type == "cuda" and out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), reference_attention(*inputs).cpu(), **TOLERANCES[dtype])


def test_cuda_prompt_attention_takes_strided_inputs(cuda_ext):
    qkv = torch.randn(3, 21, 3, 4, 64, device="cuda")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    prompt_k, prompt_v = torch.randn(2, 4, 9, 64, device="cuda").unbind(0)
    torch.testing.assert_close(cpp_ext.prompt_attention(q, k, v, prompt_k, prompt_v).double(),
                               reference_attention(q, k, v, prompt_k, prompt_v), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_prompt_attention_gradients_match_reference(cuda_ext, dtype):
    inputs = attention_inputs((2, 3, 7, 16, 5, None), dtype, device="cuda", requires_grad=True)
    cpu_inputs = [x.detach().cpu().double().requires_grad_() for x in inputs]
    grad = torch.randn(inputs[0].shape, dtype=torch.float64)
    cpp_ext.prompt_attention(*inputs).backward(grad.to("cuda", dtype))
    attend_with_prompts(*cpu_inputs).backward(grad)
    for x, reference in zip(inputs, cpu_inputs, strict=False):
        scale = max(1.0, reference.grad.abs().max().item())
        torch.testing.assert_close(x.grad.double().cpu(), reference.grad, rtol=TOLERANCES[dtype]["rtol"],
                                   atol=max(TOLERANCES[dtype]["atol"], 1e-5) * scale)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64, torch.uint8), ids=str)
@pytest.mark.parametrize("shape", INSERT_SHAPES + [(2, 4, 3, 2)], ids=str)  # 3-wide rows: narrow copies
def test_cuda_insert_prompts_matches_reference(cuda_ext, shape, dtype):
    batch, length, width, count = shape
    tokens = (torch.randn(batch, length, width) * 100).to(dtype).cuda()
    prompts = (torch.randn(count, width) * 100).to(dtype).cuda()
    assert torch.equal(cpp_ext.insert_prompts(tokens, prompts), guard.prompted.insert_prompts(tokens, prompts))


def test_cuda_opcheck(cuda_ext):
    inputs = attention_inputs((2, 3, 5, 8, 3, None), device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.clip_guard.prompt_attention.default, inputs)
    tokens = torch.randn(2, 5, 8, device="cuda", requires_grad=True)
    prompts = torch.randn(3, 8, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.clip_guard.insert_prompts.default, (tokens, prompts))
