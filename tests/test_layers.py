"""The package layers and what serving imports.

    guard    serves artifacts: imports torch, numpy and Pillow (optional backends lazily),
             never training/ or export/
    export   compiles artifacts with guard: never imports training/
    cpp_ext  the C++ operators: imports nothing of guard, training or export

The import rules are read from the source (every import statement, function-level ones
included); what a serving process really imports is measured in a fresh interpreter.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "guard": {"training", "export"},
    "export": {"training"},
    "cpp_ext": {"guard", "training", "export"},
}
NEVER_IN_SERVING = ("open_clip", "torchvision", "huggingface_hub", "timm", "training", "export")


def imported_modules(path: Path) -> set[str]:
    """Absolute module names `path` imports anywhere in it (relative imports stay inside
    the package), including `importlib.import_module("name")` with a literal name."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Call) and _called_name(node) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            modules.add(node.args[0].value)
    return modules


def _called_name(call: ast.Call) -> str | None:
    return getattr(call.func, "attr", getattr(call.func, "id", None))


def layer_violations() -> set[tuple[str, str]]:
    found = set()
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for module in imported_modules(path):
                if module.split(".")[0] in forbidden:
                    found.add((str(path.relative_to(REPO)), module))
    return found


def test_no_package_imports_a_layer_above_it():
    violations = layer_violations()
    assert not violations, "imports across the layers (module docstring): " + ", ".join(
        f"{path} imports {module}" for path, module in sorted(violations))


def test_the_scan_sees_function_level_and_importlib_imports(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("import importlib\n\ndef f():\n    from training.data import load_dataset\n"
                      "    import export.onnx\n    return importlib.import_module('guard.errors')\n"
                      "from . import sibling\n")
    assert imported_modules(source) == {"importlib", "training.data", "export.onnx", "guard.errors"}


def run_fresh(code: str, *args: str) -> dict:
    """`code` in a fresh interpreter at the repository root; its last stdout line as JSON."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code, *args], check=False, cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


PRELUDE = """
import json, sys
def top_level():
    return {name.split(".")[0] for name in sys.modules}
"""


def test_import_guard_needs_only_torch_numpy_and_pillow():
    """With torch, numpy and Pillow (and whatever they import) already in the process,
    `import guard` adds guard itself and standard-library modules, nothing else."""
    report = run_fresh(PRELUDE + """
import torch, numpy, PIL.Image
before = top_level()
import guard
print(json.dumps({"added": sorted(top_level() - before), "modules": sorted(top_level()),
                  "stdlib": sorted(sys.stdlib_module_names)}))
""")
    assert set(report["added"]) - set(report["stdlib"]) == {"guard"}, report["added"]
    assert not set(NEVER_IN_SERVING) & set(report["modules"])


@pytest.fixture(scope="module")
def onnx_file(tiny_artifact, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime", reason="the onnxruntime extra is not installed")
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("layers") / "tiny.onnx"
    export_onnx(tiny_artifact.path, out, validation_count=4)
    return out


SERVE = PRELUDE + """
import torch
import guard
after_import = top_level()
with guard.load(sys.argv[1], device="cpu") as model:
    labels = [result.label for result in model.classify([torch.rand(3, 32, 32) for _ in range(3)])]
    backend = model.backend_info["backend"]
print(json.dumps({"labels": labels, "backend": backend, "added": sorted(top_level() - after_import),
                  "modules": sorted(top_level()), "stdlib": sorted(sys.stdlib_module_names)}))
"""


def test_onnx_serving_imports_neither_open_clip_nor_torchvision(onnx_file):
    report = run_fresh(SERVE, str(onnx_file))
    assert report["backend"] == "onnxruntime" and len(report["labels"]) == 3
    assert not set(NEVER_IN_SERVING) & set(report["modules"])
    # loading and classifying adds onnxruntime and nothing else outside the standard library
    assert set(report["added"]) - set(report["stdlib"]) == {"onnxruntime"}


def test_an_artifact_directory_imports_open_clip_for_its_tower_and_nothing_of_training(tiny_artifact):
    report = run_fresh(SERVE, str(tiny_artifact.path))
    assert report["backend"] == "torch" and len(report["labels"]) == 3
    assert "open_clip" in report["modules"]  # builds the image tower
    assert not {"training", "export"} & set(report["modules"])
