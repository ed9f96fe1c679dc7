from __future__ import annotations

import json

import pytest

from rankfed.cli import build_parser, main


def test_edge_subcommands_are_registered():
    parser = build_parser()
    for cmd in ("probe", "run", "export", "infer", "manifest"):
        extra = {
            "run": ["--coordinator", "h:1", "--model", "m", "--data", "d"],
            "export": ["--model", "m", "--adapter", "a", "--out", "o"],
            "infer": ["--onnx", "x"],
            "manifest": ["--model", "m", "--task", "causal-lm", "--target-modules", "q_proj", "--out", "-"],
        }.get(cmd, [])
        args = parser.parse_args(["edge", cmd, *extra])
        assert callable(args.func)


def test_probe_json(capsys):
    assert main(["edge", "probe", "--json", "--device-class", "mobile"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device_class"] == "mobile" and data["cpu_cores"] >= 1 and data["compute_gflops"] > 0
    assert data["memory_total_bytes"] >= data["memory_free_bytes"] > 0


def test_manifest_command_writes_the_documented_format(bert_dir, llama_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["edge", "manifest", "--model", str(bert_dir), "--task", "sequence-classification",
                 "--num-labels", "3", "--target-modules", "query,value", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert list(m) == ["format", "model_id", "weights_sha256", "task", "num_labels", "target_modules",
                       "modules_to_save", "modules", "dense"]
    assert m["format"] == "rankfed-model-manifest/1" and m["modules_to_save"] == ["classifier"]
    assert m["modules"]["bert.encoder.layer.1.attention.self.value"] == [32, 32]
    assert m["dense"] == {"classifier.bias": [3], "classifier.weight": [3, 32]}
    assert main(["edge", "manifest", "--model", str(llama_dir), "--task", "causal-lm",
                 "--target-modules", "q_proj,down_proj", "--out", "-"]) == 0
    lm = json.loads(capsys.readouterr().out)
    assert lm["dense"] == {} and lm["num_labels"] == 0
    assert lm["modules"]["model.layers.0.mlp.down_proj"] == [32, 64]
    assert lm["modules"]["model.layers.0.self_attn.q_proj"] == [32, 32]


def test_coordinator_accepts_our_manifest(bert_dir, tmp_path):
    manifest_mod = pytest.importorskip("rankfed.protocol.manifest")
    out = tmp_path / "m.json"
    main(["edge", "manifest", "--model", str(bert_dir), "--task", "sequence-classification",
          "--num-labels", "3", "--target-modules", "query,value", "--out", str(out)])
    loaded = manifest_mod.load_manifest(out)
    assert len(loaded.modules) == 4 and loaded.dense["classifier.weight"] == (3, 32)
    # --freeze-below-layer 1: the coordinator serves the top layer's modules only
    assert main(["edge", "manifest", "--model", str(bert_dir), "--task", "sequence-classification",
                 "--num-labels", "3", "--target-modules", "query,value", "--freeze-below-layer", "1",
                 "--out", str(out)]) == 0
    top = manifest_mod.load_manifest(out)
    assert sorted(top.modules) == [f"bert.encoder.layer.1.attention.self.{n}" for n in ("query", "value")]


def test_errors_are_one_line_and_exit_1(tmp_path, capsys):
    assert main(["edge", "export", "--model", str(tmp_path), "--adapter", str(tmp_path / "none.safetensors"),
                 "--out", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rankfed edge export: error: cannot read adapter") and err.count("\n") == 1
    assert main(["edge", "manifest", "--model", str(tmp_path), "--task", "causal-lm",
                 "--target-modules", "q", "--out", "-"]) == 1
    assert "no config.json" in capsys.readouterr().err
