"""Merge an adapter into the base model and export it to one self-contained ONNX file.

Recipe (engineering.md §3): `merge_and_unload`, a logits-only wrapper (no ModelOutput, no KV
cache), `torch.onnx.export(dynamo=True)` with dynamic batch and sequence axes and
`external_data=False`. The file carries what `infer.py` needs in its metadata_props: the task,
label names, the tokenizer (tokenizer.json text) and the identities of base model and adapter,
so `rankfed edge infer --onnx model.onnx` needs neither torch nor the model directory.

The export is written to a temporary name and renamed only after onnxruntime matched torch
on several random batches (max abs difference <= tolerance, default 1e-4).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rankfed.aggregation import Adapter, decode_adapter
from rankfed.protocol import LoraSettings

from .errors import AdapterError, ExportError, ParityError
from .model import (
    load_base_model,
    load_tokenizer,
    peft_model_for_adapter,
    weights_sha256,
)

if TYPE_CHECKING:
    import torch

ONNX_FORMAT = "rankfed-onnx/1"
DEFAULT_TOLERANCE = 1e-4
# (batch, seq) of the parity batches; rows get random lengths (padding) where seq > 2.
PARITY_SHAPES = ((1, 8), (3, 17), (2, 64), (4, 5))
# Known harmless exporter warnings (engineering.md §3): silenced around the export only.
_HARMLESS_EXPORT_WARNINGS = (
    (r"# The axis name: .* will not be used", UserWarning),
    (r".*isinstance\(treespec, LeafSpec\)", FutureWarning),
)


@dataclass(frozen=True)
class ExportReport:
    path: str
    task: str
    bytes: int
    export_seconds: float
    max_abs_diff: float
    parity_batches: int
    quantized_path: str = ""
    quantized_bytes: int = 0
    quantized_max_abs_diff: float = 0.0
    quantized_argmax_agreement: float = 0.0


def read_adapter(path: str | Path) -> Adapter:
    path = Path(path)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AdapterError(f"cannot read adapter {path}: {err}") from None
    try:
        return decode_adapter(data)
    except Exception as err:  # AdapterFormatError / AdapterValidationError, named by key
        raise AdapterError(f"{path}: {err}") from err


def settings_for_adapter(adapter: Adapter) -> LoraSettings:
    """The LoRA settings that reproduce ``adapter``'s structure (targets, heads, ranks)."""
    if not adapter.modules:
        raise AdapterError("the adapter holds no LoRA modules")
    first = next(iter(adapter.modules.values()))
    return LoraSettings(
        rank=first.rank,
        alpha=first.alpha,
        target_modules=tuple(sorted({n.rsplit(".", 1)[-1] for n in adapter.modules})),
        use_rslora=adapter.use_rslora,
        modules_to_save=tuple(sorted({n.rsplit(".", 1)[0] for n in adapter.dense})),
    )


def infer_task(adapter: Adapter) -> str:
    return "sequence-classification" if adapter.dense else "causal-lm"


def num_labels_of(adapter: Adapter) -> int:
    weights = [v for n, v in adapter.dense.items() if n.endswith(".weight") and v.ndim == 2]
    if not weights:
        raise AdapterError("a sequence-classification adapter must carry its head (e.g. classifier.weight)")
    return int(weights[0].shape[0])


def merged_model(model_dir: str | Path, adapter: Adapter, task: str) -> torch.nn.Module:
    """The base model with ``adapter`` merged into its weights (plain transformers model)."""
    num_labels = num_labels_of(adapter) if task == "sequence-classification" else 0
    base = load_base_model(model_dir, task, num_labels=num_labels)
    peft_model = peft_model_for_adapter(base, adapter, settings_for_adapter(adapter), task, copy_base=False)
    return peft_model.merge_and_unload().eval()


def logits_only(model: torch.nn.Module, task: str) -> torch.nn.Module:
    """``model`` behind a plain-tensor interface: (input_ids, attention_mask) -> logits, no
    ModelOutput and no KV cache, in eval mode: what the exporter traces."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            if task == "causal-lm":
                return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    return LogitsOnly(model).eval()


def _parity_inputs(vocab_size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for batch, seq in PARITY_SHAPES:
        ids = rng.integers(0, vocab_size, size=(batch, seq), dtype=np.int64)
        mask = np.ones((batch, seq), dtype=np.int64)
        for row in range(1, batch):  # row 0 full length; the others padded on the right
            mask[row, rng.integers(2, seq + 1) :] = 0
        out.append((ids, mask))
    return out


def ort_session(path: str, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def compare(
    model: torch.nn.Module, task: str, onnx_path: str, *, vocab_size: int, seed: int = 0, threads: int = 1
) -> tuple[float, float]:
    """(max abs difference, argmax agreement) of onnxruntime vs torch on the parity batches."""
    import torch

    session = ort_session(onnx_path, threads)
    wrapper = logits_only(model, task)
    worst, agree, total = 0.0, 0, 0
    for ids, mask in _parity_inputs(vocab_size, seed):
        with torch.no_grad():
            expected = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        got = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        if got.shape != expected.shape:
            raise ExportError(f"onnxruntime output shape {got.shape}, torch {expected.shape}")
        if task == "causal-lm":  # compare the positions the mask keeps
            keep = mask.astype(bool)
            got, expected = got[keep], expected[keep]
        worst = max(worst, float(np.max(np.abs(got - expected))))
        agree += int(np.sum(got.argmax(-1) == expected.argmax(-1)))
        total += int(np.prod(got.shape[:-1]))
    return worst, agree / max(total, 1)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def export_onnx(
    model_dir: str | Path,
    adapter_path: str | Path,
    out: str | Path,
    *,
    task: str | None = None,
    labels: list[str] | None = None,
    max_length: int = 512,
    tolerance: float = DEFAULT_TOLERANCE,
    quantize: bool = False,
    threads: int = 1,
    seed: int = 0,
) -> ExportReport:
    """Merge, export, check parity, optionally quantize. Raises ParityError above ``tolerance``."""
    import torch

    adapter = read_adapter(adapter_path)
    task = task or infer_task(adapter)
    model = merged_model(model_dir, adapter, task)
    tokenizer = load_tokenizer(model_dir)
    if labels is None and task == "sequence-classification":
        id2label = getattr(model.config, "id2label", {}) or {}
        labels = [str(id2label.get(i, i)) for i in range(num_labels_of(adapter))]
    max_positions = int(getattr(model.config, "max_position_embeddings", max_length) or max_length)
    max_length = min(max_length, max_positions)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")

    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=max_length)
    example = (
        torch.randint(0, model.config.vocab_size, (2, 16)),
        torch.ones(2, 16, dtype=torch.int64),
    )
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            for message, category in _HARMLESS_EXPORT_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            program = torch.onnx.export(
                logits_only(model, task),
                example,
                dynamo=True,
                verbose=False,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            )
    except Exception as err:  # the exporter raises many types; name the step that failed
        raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: {err}") from err
    adapter_bytes = Path(adapter_path)
    adapter_bytes = adapter_bytes / "adapter_model.safetensors" if adapter_bytes.is_dir() else adapter_bytes
    props = {
        "rankfed.format": ONNX_FORMAT,
        "rankfed.task": task,
        "rankfed.labels": json.dumps(labels),
        "rankfed.max_length": str(max_length),
        "rankfed.tokenizer": tokenizer.backend_tokenizer.to_str(),
        "rankfed.pad_token_id": str(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        "rankfed.eos_token_id": str(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1),
        "rankfed.base_weights_sha256": weights_sha256(model_dir),
        "rankfed.adapter_sha256": _sha256_file(adapter_bytes),
    }
    program.model.metadata_props.update(props)
    program.save(str(tmp), external_data=False)
    export_seconds = time.perf_counter() - started
    try:
        diff, _ = compare(model, task, str(tmp), vocab_size=model.config.vocab_size, seed=seed, threads=threads)
        if not diff <= tolerance:
            raise ParityError(
                f"onnxruntime differs from torch by {diff:.3g} (> {tolerance:g}); the export was not written",
                max_abs_diff=diff,
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    report = ExportReport(
        path=str(out),
        task=task,
        bytes=out.stat().st_size,
        export_seconds=export_seconds,
        max_abs_diff=diff,
        parity_batches=len(PARITY_SHAPES),
    )
    if quantize:
        report = _quantize(model, task, out, report, threads=threads, seed=seed)
    return report


def _quantize(
    model: torch.nn.Module, task: str, out: Path, report: ExportReport, *, threads: int, seed: int
) -> ExportReport:
    """int8 dynamic quantization next to ``out`` (``*.int8.onnx``); parity reported, not enforced."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    qpath = out.with_name(out.stem + ".int8.onnx")
    # The dynamo exporter's value_info trips the quantizer's shape inference ("Inferred shape
    # and existing shape differ"); the quantizer re-infers shapes, so quantize a copy without it.
    plain = onnx.load(str(out))
    del plain.graph.value_info[:]
    tmp = out.with_name(f".{out.stem}.novalueinfo.onnx")
    try:
        onnx.save(plain, str(tmp))
        quantize_dynamic(str(tmp), str(qpath), weight_type=QuantType.QInt8)
    finally:
        tmp.unlink(missing_ok=True)
    _copy_metadata(out, qpath)
    diff, agreement = compare(model, task, str(qpath), vocab_size=model.config.vocab_size, seed=seed, threads=threads)
    return ExportReport(
        **{
            **report.__dict__,
            "quantized_path": str(qpath),
            "quantized_bytes": qpath.stat().st_size,
            "quantized_max_abs_diff": diff,
            "quantized_argmax_agreement": agreement,
        }
    )


def _copy_metadata(src: Path, dst: Path) -> None:
    import onnx

    source = onnx.load(str(src), load_external_data=False)
    target = onnx.load(str(dst))
    have = {p.key for p in target.metadata_props}
    for prop in source.metadata_props:
        if prop.key not in have:
            target.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(target, str(dst))
