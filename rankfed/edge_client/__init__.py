"""The RankFed edge client: probe a device, train LoRA at the assigned rank, stream updates,
export the merged model to ONNX and serve it with onnxruntime.

Modules: errors (exception tree), protocol (dataclasses), probe, model (base model and
peft <-> Adapter), data, train, serde + transport (the only grpc users), runner (the loop),
export, infer (onnxruntime only), manifest, cli. Importing this package imports nothing heavy.
"""
