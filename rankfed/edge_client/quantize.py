"""Smaller weights for the exported model: int8 (onnxruntime dynamic quantization,
per-channel) and fp16 weight storage.

Chosen by held-out accuracy (issue 16; bench/edge_bench.py, docs/edge-client.md), on the
demo's BBC News adapter and a WordNet-supersense adapter (24 classes, the harder case):

- per-tensor weight scales (onnxruntime's default) cost 1.8 points on WordNet (91.5 %
  argmax agreement with fp32); per-output-channel scales cost none (96.7 %): one scale per
  row of a weight matrix keeps rows with small weights from rounding to a few levels.
- int8 embeddings (Gather) cost 0.5 points with per-tensor scales and nothing measurable with
  per-channel ones, and keeping them fp32 makes the file 57 MiB instead of 23: quantized.
- the classification head is not quantized by dynamic quantization either way (a Gemm).
- static quantization (activation scales calibrated on one device's own training data, QDQ)
  cost 2 points on WordNet: activation outliers in a transformer do not fit one fixed scale;
  dynamic quantization measures them per input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError


@dataclass(frozen=True)
class QuantizeSettings:
    per_channel: bool = True
    op_types: tuple[str, ...] = ("MatMul", "Gather", "Attention", "EmbedLayerNormalization")
    reduce_range: bool = False  # 7-bit weights: for CPUs without VNNI; cost 0.2-0.5 points here


def quantize_int8(src: Path, dst: Path, settings: QuantizeSettings = QuantizeSettings()) -> None:
    """Dynamic int8 quantization of ``src`` into ``dst`` (one file, metadata kept)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The dynamo exporter's value_info trips the quantizer's shape inference ("Inferred shape
    # and existing shape differ"); the quantizer re-infers shapes, so give it a copy without.
    model = onnx.load(str(src))
    metadata = [(p.key, p.value) for p in model.metadata_props]
    del model.graph.value_info[:]
    quiet = _DropPreprocessAdvice()
    logging.getLogger().addFilter(quiet)
    try:
        quantize_dynamic(
            model, str(dst), weight_type=QuantType.QInt8, per_channel=settings.per_channel,
            reduce_range=settings.reduce_range, op_types_to_quantize=list(settings.op_types),
            # onnx shape inference cannot type the outputs of fused com.microsoft ops; all are fp32.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    except Exception as err:  # the quantizer raises assorted types; name the step
        raise ExportError(f"int8 quantization failed: {type(err).__name__}: {err}") from err
    finally:
        logging.getLogger().removeFilter(quiet)
    quantized = onnx.load(str(dst))
    have = {p.key for p in quantized.metadata_props}
    for key, value in metadata:
        if key not in have:
            quantized.metadata_props.add(key=key, value=value)
    onnx.save(quantized, str(dst))


def fp16_weights(src: Path, dst: Path) -> None:
    """``src`` with fp16 weights and activations into ``dst``; inputs and outputs stay as they
    are (int64 ids, fp32 logits), so `infer.py` and its callers do not change. Metadata kept.

    A storage format for targets that compute in fp16 (GPU, NNAPI, CoreML, ARM CPUs with
    fp16 kernels). onnxruntime's x86 CPU provider has no fp16 kernels for these ops: it inserts
    casts and computes in fp32 (measured: fp32 latency, half the file; bench/edge_bench.py).
    """
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    try:
        model = OnnxModel(onnx.load(str(src)))
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(dst), use_external_data_format=False)
    except Exception as err:  # the converter raises assorted types; name the step
        raise ExportError(f"fp16 conversion failed: {type(err).__name__}: {err}") from err


class _DropPreprocessAdvice(logging.Filter):
    """The quantizer logs (root logger, WARNING) advice to run its shape pre-processing,
    written for CNNs; it cannot type the fused com.microsoft ops here, so the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "consider to run pre-processing" not in record.getMessage()
