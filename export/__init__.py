"""Compile purified artifacts: ONNX (export.onnx), TensorRT (export.trt), AOTInductor (export.aoti)."""
