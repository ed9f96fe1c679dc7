"""The RankFed edge client: probe a device, train LoRA at the assigned rank, stream updates,
export the merged model to ONNX and serve it with onnxruntime.

Modules: errors (exception tree), probe, model (base model and peft <-> Adapter), data,
train, transport (the only grpc user; the messages and their serde are rankfed.protocol),
runner (the loop), strategies (what a round does in each federation mode), provider (where
the base model comes from), personal (pFedLoRA's model and private state), export, infer
(onnxruntime only), manifest, cli. Importing this package imports nothing heavy.
"""
