"""Graph optimizations done once at export time, so a device loads a ready graph.

- `fuse_transformer`: onnxruntime's transformer optimizer (``model_type="bert"``) rewrites
  the exported encoder into its fused CPU kernels (Attention, EmbedLayerNormalization,
  SkipLayerNormalization, BiasGelu). It recognises the attention pattern of the TorchScript
  exporter with eager attention only: on the dynamo graph it fused no attention (issue 16),
  which is why `export.py` exports BERT-family encoders that way.
- `to_ort_format`: the ORT flatbuffer format that onnxruntime's mobile and minimal builds
  load (they do not parse .onnx). Optimized at the "extended" level, which is independent
  of the CPU it is made on (the "all" level adds layout changes for the exporting CPU).

Both keep the file's metadata (tokenizer, labels), which `infer.py` reads (the optimizer
carries metadata_props over; the ORT format stores them too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError

# config.model_type values whose encoder the "bert" fusion patterns cover (measured: bert).
FUSABLE_MODEL_TYPES = ("bert",)
FUSED_OPS = ("Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu")


@dataclass(frozen=True)
class FusionReport:
    fused: dict[str, int]  # fused op type -> count in the saved graph

    @property
    def attention_fused(self) -> bool:
        return self.fused.get("Attention", 0) + self.fused.get("MultiHeadAttention", 0) > 0


def fuse_transformer(src: Path, dst: Path, *, num_heads: int, hidden_size: int) -> FusionReport:
    """Fuse ``src`` into ``dst`` (one file, metadata kept); the fused op counts."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        # opt_level 0: the Python fusions only; onnxruntime's own graph optimizations still
        # run when a session loads the file, on the device's CPU.
        optimized = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                   opt_level=0)
    except Exception as err:  # the optimizer raises assorted types; name the step
        raise ExportError(f"onnxruntime transformer optimizer failed: {type(err).__name__}: {err}") from err
    model: onnx.ModelProto = optimized.model
    counts = {op: sum(1 for n in model.graph.node if n.op_type == op) for op in (*FUSED_OPS, "MultiHeadAttention")}
    # save_model_to_file adds the com.microsoft opset import the fused ops need.
    optimized.save_model_to_file(str(dst), use_external_data_format=False)
    return FusionReport(fused={k: v for k, v in counts.items() if v})


def to_ort_format(src: Path, dst: Path) -> None:
    """Write ``src`` as an ORT-format model ``dst`` (what onnxruntime mobile builds load)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    options.add_session_config_entry("session.save_model_format", "ORT")
    try:
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's Fail/InvalidGraph types
        raise ExportError(f"cannot convert {src} to ORT format: {err}") from err
    if not dst.is_file():
        raise ExportError(f"onnxruntime wrote no ORT-format file at {dst}")

