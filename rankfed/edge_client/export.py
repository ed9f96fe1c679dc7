"""Merge an adapter into the base model and export it to one self-contained ONNX file.

Recipe (engineering.md §3): `merge_and_unload`, a logits-only wrapper (no ModelOutput, no KV
cache), `torch.onnx.export` with dynamic batch and sequence axes, one file. The file carries
what `infer.py` needs in its metadata_props: the task, label names, the tokenizer
(tokenizer.json text) and the identities of base model and adapter, so
`rankfed edge infer --onnx model.onnx` needs neither torch nor the model directory.

Exporter (issue 16): BERT-family encoders go through the TorchScript exporter with eager
attention, whose graph onnxruntime's transformer optimizer fuses into its Attention,
SkipLayerNormalization and BiasGelu kernels (`optimize.py`); the fused graph is what is
saved. A BertForSequenceClassification is exported with a last layer that computes only the
[CLS] row its head reads (`cls_only.py`). Everything else (causal LMs) uses `dynamo=True`,
on which that optimizer fused no attention.

Every file is written to a temporary name and renamed only after onnxruntime matched torch
on several random batches (max abs difference <= tolerance, default 1e-4). Lossy exports
(`quantize`: int8; `fp16`: fp16 weights) are gated on held-out accuracy instead
(`evaluate.py`): refused when they fall more than ``max_accuracy_drop`` points below fp32 on
the validation file, unless forced.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rankfed.aggregation import Adapter, decode_adapter, read_adapter_metadata
from rankfed.protocol import LoraSettings
from rankfed.protocol.artifact import ADAPTER_FILE, AdapterCard

from .errors import (
    AccuracyGateError,
    AdapterError,
    ConfigError,
    ExportError,
    ParityError,
)
from .evaluate import DEFAULT_EVAL_MAX_LENGTH, accuracy_gate
from .model import (
    load_base_model,
    load_tokenizer,
    peft_model_for_adapter,
    weights_sha256,
)
from .optimize import FUSABLE_MODEL_TYPES, fuse_transformer, to_ort_format
from .quantize import fp16_weights, quantize_int8

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from .evaluate import HeldoutSet, Score

ONNX_FORMAT = "rankfed-onnx/1"
DEFAULT_TOLERANCE = 1e-4
DEFAULT_MAX_ACCURACY_DROP = 1.0  # points of held-out accuracy an int8 export may lose
EXPORTERS = ("auto", "dynamo", "torchscript")
TORCHSCRIPT_OPSET = 17  # LayerNormalization is one op from 17 on
# (batch, seq) of the parity batches; rows get random lengths (padding) where seq > 2.
PARITY_SHAPES = ((1, 8), (3, 17), (2, 64), (4, 5))
# Known harmless exporter warnings (engineering.md §3): silenced around the export only.
_HARMLESS_EXPORT_WARNINGS = (
    (r"# The axis name: .* will not be used", UserWarning),
    (r".*isinstance\(treespec, LeafSpec\)", FutureWarning),
    # TorchScript path: the exporter announces its own deprecation, the tracer flags Python
    # bools on shapes in transformers' mask code (fixed for the traced length; parity runs
    # other lengths and padded rows), and advanced indexing is lowered to Gather.
    (r"You are using the legacy TorchScript-based ONNX export", DeprecationWarning),
    (r"The feature will be removed", DeprecationWarning),
    (r"Converting a tensor to a Python boolean", Warning),
    (r"Exporting aten::index operator", UserWarning),
)


@dataclass(frozen=True)
class ExportReport:
    path: str
    task: str
    bytes: int
    export_seconds: float
    max_abs_diff: float
    parity_batches: int
    exporter: str = "dynamo"
    fused_ops: dict[str, int] = field(default_factory=dict)
    cls_only_last_layer: bool = False  # `cls_only.py`: the last layer computes the [CLS] row only
    validation_path: str = ""
    validation_examples: int = 0
    accuracy: float | None = None  # fp32 held-out accuracy (validation file given)
    quantized_path: str = ""
    quantized_bytes: int = 0
    quantized_max_abs_diff: float = 0.0
    quantized_argmax_agreement: float = 0.0  # on the random parity batches
    quantized_accuracy: float | None = None
    quantized_heldout_agreement: float | None = None  # argmax agreement with fp32, held-out set
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
    forced: bool = False  # written although the accuracy gate refused it
    mobile_path: str = ""
    mobile_bytes: int = 0
    mobile_accuracy: float | None = None
    fp16_path: str = ""
    fp16_bytes: int = 0
    fp16_max_abs_diff: float = 0.0
    fp16_argmax_agreement: float = 0.0  # on the random parity batches
    fp16_accuracy: float | None = None
    fp16_heldout_agreement: float | None = None  # argmax agreement with fp32, held-out set
    fp16_forced: bool = False  # written although the accuracy gate refused it


def read_adapter(path: str | Path) -> Adapter:
    return read_adapter_and_card(path)[0]


def read_adapter_and_card(path: str | Path) -> tuple[Adapter, AdapterCard | None]:
    """The adapter in a .safetensors file (or a directory holding adapter_model.safetensors)
    and the card in its metadata (None for an adapter written without one), from one read."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AdapterError(f"cannot read adapter {path}: {err}") from None
    try:
        return decode_adapter(data), AdapterCard.from_metadata(read_adapter_metadata(data))
    except Exception as err:  # AdapterFormatError / AdapterValidationError / DecodeError, named by key
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


def ort_session(path: str, threads: int, *, spin: bool = False) -> Any:
    """A plain onnxruntime session with the device's options (`infer.session_options`)."""
    import onnxruntime as ort

    from .infer import session_options

    return ort.InferenceSession(path, session_options(threads, spin=spin), providers=["CPUExecutionProvider"])


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


def choose_exporter(model: torch.nn.Module, task: str, exporter: str) -> str:
    if exporter not in EXPORTERS:
        raise ConfigError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if exporter != "auto":
        return exporter
    model_type = getattr(model.config, "model_type", "")
    return "torchscript" if task == "sequence-classification" and model_type in FUSABLE_MODEL_TYPES else "dynamo"


def _trace(model: torch.nn.Module, task: str, path: Path, *, exporter: str, max_length: int, cls_only: bool) -> None:
    """``model`` (logits only) to the ONNX file ``path``, dynamic batch and sequence axes;
    ``cls_only``: a BERT classifier whose last layer computes the [CLS] row only."""
    import torch

    from .cls_only import ClsOnlyLastLayer

    example = (torch.randint(0, _config(model).vocab_size, (2, 16)), torch.ones(2, 16, dtype=torch.int64))
    inputs, outputs = ["input_ids", "attention_mask"], ["logits"]
    try:
        with warnings.catch_warnings():
            for message, category in _HARMLESS_EXPORT_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            if exporter == "torchscript":
                # The optimizer's attention patterns are those of eager attention, not SDPA.
                model.set_attn_implementation("eager")  # type: ignore[operator]
                axes = {0: "batch", 1: "seq"}
                wrapper = ClsOnlyLastLayer(model).eval() if cls_only else logits_only(model, task)
                torch.onnx.export(
                    wrapper, example, str(path), dynamo=False, opset_version=TORCHSCRIPT_OPSET,
                    dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}}
                    if task == "sequence-classification" else
                    {"input_ids": axes, "attention_mask": axes, "logits": axes},
                    input_names=inputs, output_names=outputs,
                )
                return
            batch = torch.export.Dim("batch", min=1, max=1024)
            seq = torch.export.Dim("seq", min=2, max=max_length)
            program = torch.onnx.export(
                logits_only(model, task), example, dynamo=True, verbose=False,
                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                input_names=inputs, output_names=outputs,
            )
            if program is None:
                raise ExportError("torch.onnx.export (dynamo) returned no program")
            program.save(str(path), external_data=False)
    except Exception as err:  # the exporter raises many types; name the step that failed
        raise ExportError(f"torch.onnx.export ({exporter}) failed: {type(err).__name__}: {err}") from err


def _config(model: torch.nn.Module) -> Any:
    """The transformers config (typed Any: torch types ``Module.__getattr__`` as Tensor | Module)."""
    return model.config


def _set_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    model.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in props.items())
    onnx.save(model, str(path))


def _check_parity(model: torch.nn.Module, task: str, path: Path, *, tolerance: float, seed: int,
                  threads: int, what: str) -> float:
    diff, _ = compare(model, task, str(path), vocab_size=_config(model).vocab_size, seed=seed, threads=threads)
    if not diff <= tolerance:
        raise ParityError(
            f"onnxruntime ({what}) differs from torch by {diff:.3g} (> {tolerance:g}); the export was not written",
            max_abs_diff=diff,
        )
    return diff


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
    validation: str | Path | None = None,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    eval_max_length: int = DEFAULT_EVAL_MAX_LENGTH,
    force: bool = False,
    mobile: bool = False,
    fp16: bool = False,
    exporter: str = "auto",
    optimize: bool = True,
    threads: int = 1,
    seed: int = 0,
) -> ExportReport:
    """Merge, export, optimize, check parity; optionally quantize to int8 and/or write fp16
    weights (each accuracy-gated) and write the ORT format. Raises ParityError above
    ``tolerance``, AccuracyGateError when int8 or fp16 loses more than ``max_accuracy_drop``
    points of held-out accuracy (unless ``force``)."""
    # A global adapter describes itself (task, labels): what the user does not pass comes
    # from its card, and only an adapter without one falls back to guessing.
    adapter, card = read_adapter_and_card(adapter_path)
    task = task or (card.task if card is not None else infer_task(adapter))
    if labels is None and card is not None and card.labels:
        labels = list(card.labels)
    for flag, asked in (("--quantize", quantize), ("--fp16", fp16)):
        if asked and validation is None and not force:
            raise ConfigError(f"{flag} needs --validation FILE (held-out examples) to check its accuracy; "
                              "pass --force to write it unchecked")
    if validation is not None and task != "sequence-classification":
        raise ConfigError(f"--validation scores classification accuracy; a {task} model has no such metric here")
    model = merged_model(model_dir, adapter, task)
    tokenizer = load_tokenizer(model_dir)
    if labels is None and task == "sequence-classification":
        id2label = getattr(model.config, "id2label", {}) or {}
        labels = [str(id2label.get(i, i)) for i in range(num_labels_of(adapter))]
    max_positions = int(getattr(model.config, "max_position_embeddings", max_length) or max_length)
    max_length = min(max_length, max_positions)
    exporter = choose_exporter(model, task, exporter)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    fused_tmp = out.with_name(f".{out.name}.fused.partial")

    started = time.perf_counter()
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
        "rankfed.exporter": exporter,
    }
    from .cls_only import supports_cls_only  # imports torch

    fused: dict[str, int] = {}
    cls_only = optimize and exporter == "torchscript" and supports_cls_only(model)
    props["rankfed.cls_only_last_layer"] = str(cls_only).lower()
    try:
        _trace(model, task, tmp, exporter=exporter, max_length=max_length, cls_only=cls_only)
        _set_metadata(tmp, props)
        if optimize and exporter == "torchscript":
            cfg = _config(model)
            fused = fuse_transformer(tmp, fused_tmp, num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size).fused
            os.replace(fused_tmp, tmp)
        export_seconds = time.perf_counter() - started
        diff = _check_parity(model, task, tmp, tolerance=tolerance, seed=seed, threads=threads, what="fp32")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        fused_tmp.unlink(missing_ok=True)
    report = ExportReport(
        path=str(out), task=task, bytes=out.stat().st_size, export_seconds=export_seconds, max_abs_diff=diff,
        parity_batches=len(PARITY_SHAPES), exporter=exporter, fused_ops=fused, cls_only_last_layer=cls_only,
        max_accuracy_drop=max_accuracy_drop,
    )
    heldout: HeldoutSet | None = None
    fp32_score: Score | None = None
    if validation is not None:
        from .evaluate import load_heldout, score
        from .infer import OnnxModel

        fp32 = OnnxModel(out, threads=threads)
        heldout = load_heldout(validation, fp32, max_length=eval_max_length)
        fp32_score = score(fp32, heldout)
        report = replace(report, validation_path=str(validation), validation_examples=len(heldout.labels),
                         accuracy=fp32_score.accuracy)
    final = out
    if quantize:
        q = _lossy(model, task, out, "int8", quantize_int8, heldout, fp32_score, report.max_accuracy_drop,
                   force=force, threads=threads, seed=seed)
        report = replace(report, quantized_path=q.path, quantized_bytes=q.bytes, quantized_max_abs_diff=q.max_abs_diff,
                         quantized_argmax_agreement=q.argmax_agreement, quantized_accuracy=q.accuracy,
                         quantized_heldout_agreement=q.heldout_agreement, forced=q.forced)
        final = Path(report.quantized_path)
    if fp16:
        h = _lossy(model, task, out, "fp16", fp16_weights, heldout, fp32_score, report.max_accuracy_drop,
                   force=force, threads=threads, seed=seed)
        report = replace(report, fp16_path=h.path, fp16_bytes=h.bytes, fp16_max_abs_diff=h.max_abs_diff,
                         fp16_argmax_agreement=h.argmax_agreement, fp16_accuracy=h.accuracy,
                         fp16_heldout_agreement=h.heldout_agreement, fp16_forced=h.forced)
    if mobile:
        report = _mobile(final, report, heldout, threads=threads)
    return report


@dataclass(frozen=True)
class _Lossy:
    path: str
    bytes: int
    max_abs_diff: float
    argmax_agreement: float
    accuracy: float | None
    heldout_agreement: float | None
    forced: bool


def _lossy(
    model: torch.nn.Module, task: str, out: Path, kind: str, convert: Callable[[Path, Path], None],
    heldout: HeldoutSet | None, fp32_score: Score | None, max_drop: float, *, force: bool, threads: int, seed: int,
) -> _Lossy:
    """``convert(out)`` into ``*.{kind}.onnx`` next to ``out`` (int8: `quantize.py`; fp16);
    compared with torch on the parity batches and gated on held-out accuracy."""
    path = out.with_name(f"{out.stem}.{kind}.onnx")
    tmp = out.with_name(f".{path.name}.partial")
    accuracy = heldout_agreement = None
    forced = False
    try:
        convert(out, tmp)
        diff, agreement = compare(model, task, str(tmp), vocab_size=_config(model).vocab_size, seed=seed,
                                  threads=threads)
        if heldout is not None and fp32_score is not None:
            from .evaluate import score
            from .infer import OnnxModel

            lossy_score = score(OnnxModel(tmp, threads=threads), heldout)
            accuracy, heldout_agreement = lossy_score.accuracy, lossy_score.agreement(fp32_score)
            try:
                accuracy_gate(fp32_score.accuracy, lossy_score.accuracy, max_drop=max_drop,
                              what=f"{kind} ({path.name})", where=f"{heldout.path} ({len(heldout.labels)} examples)")
            except AccuracyGateError:
                if not force:
                    raise
                forced = True
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _Lossy(path=str(path), bytes=path.stat().st_size, max_abs_diff=diff, argmax_agreement=agreement,
                  accuracy=accuracy, heldout_agreement=heldout_agreement, forced=forced)


def _mobile(src: Path, report: ExportReport, heldout: HeldoutSet | None, *, threads: int) -> ExportReport:
    """``src`` in ORT format (``*.ort``), for onnxruntime's mobile and minimal builds."""
    dst = src.with_suffix(".ort")
    to_ort_format(src, dst)
    report = replace(report, mobile_path=str(dst), mobile_bytes=dst.stat().st_size)
    if heldout is not None:
        from .evaluate import score
        from .infer import OnnxModel

        report = replace(report, mobile_accuracy=score(OnnxModel(dst, threads=threads), heldout).accuracy)
    return report
