"""The fused prompt attention as one ONNX node: `clip_guard::PromptAttention`, for a TensorRT plugin.

`export.onnx.export_onnx(ARTIFACT, OUT, attention="custom")` exports the folded graph with
every prompted block's attention as a single custom-domain node

    PromptAttention(q [N, H, T, d], k, v, prompt_k [H, b, d], prompt_v) -> [N, H, T, d]
    = softmax(q [k ; prompt_k]^T / sqrt(d)) [v ; prompt_v]        (domain clip_guard, version 1)

instead of the standard operators (concatenation of the broadcast prompt keys and values,
then attention). It is the ONNX face of the `clip_guard::prompt_attention` torch operator
(cpp_ext), which the export traces, so the C++ extension must be built. A runtime needs a
kernel for the node: TensorRT through a plugin of that name, which clip-guard does not
build yet (it could not be compiled and tested on these machines, docs/export.md), and
onnxruntime not at all: the node is in a custom domain with no registered kernel ("is not
a registered function/op"). Both serve the standard-operator export, and the command line
does not offer this one. The graph is validated with ONNX's reference evaluator and the
numpy kernel below against the torch model (tests/test_cpp_ext.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DOMAIN = "clip_guard"
OP_TYPE = "PromptAttention"
VERSION = 1


def register_schema() -> None:
    """Declare the node to onnx (once per process): the exporter and the checker need its signature."""
    from onnx import defs

    if defs.has(OP_TYPE, DOMAIN):
        return
    parameter = defs.OpSchema.FormalParameter
    defs.register_schema(defs.OpSchema(
        OP_TYPE, DOMAIN, VERSION,
        doc=__doc__.split("\n\n")[1],
        inputs=[parameter(name, "T") for name in ("q", "k", "v", "prompt_k", "prompt_v")],
        outputs=[parameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors")],
    ))


def translation_table() -> dict:
    """torch.onnx.export's custom_translation_table entry mapping the torch operator to the node."""
    import onnxscript

    register_schema()
    opset = onnxscript.values.Opset(domain=DOMAIN, version=VERSION)

    def prompt_attention(q, k, v, prompt_k, prompt_v):
        return opset.PromptAttention(q, k, v, prompt_k, prompt_v)

    return {torch.ops.clip_guard.prompt_attention.default: prompt_attention}


def reference_kernel(q: np.ndarray, k: np.ndarray, v: np.ndarray, prompt_k: np.ndarray,
                     prompt_v: np.ndarray) -> np.ndarray:
    """The node's meaning in numpy (float64 accumulation), for validation and tests."""
    n = q.shape[0]
    keys = np.concatenate([k, np.broadcast_to(prompt_k, (n, *prompt_k.shape))], axis=2).astype(np.float64)
    values = np.concatenate([v, np.broadcast_to(prompt_v, (n, *prompt_v.shape))], axis=2).astype(np.float64)
    scores = q.astype(np.float64) @ keys.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return (weights @ values).astype(q.dtype)


def run_reference(path: str | Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, embedding) of a custom-attention graph on ONNX's reference evaluator."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class PromptAttention(OpRun):
        op_domain = DOMAIN

        def _run(self, q, k, v, prompt_k, prompt_v):
            return (reference_kernel(q, k, v, prompt_k, prompt_v),)

    evaluator = ReferenceEvaluator(str(path), new_ops=[PromptAttention])
    logits, embedding = evaluator.run(None, {"images": images.numpy()})
    return torch.from_numpy(logits), torch.from_numpy(embedding)


def count_nodes(path: str | Path) -> int:
    """How many PromptAttention nodes a graph has (0: standard operators only)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.domain == DOMAIN and node.op_type == OP_TYPE for node in graph.node)
