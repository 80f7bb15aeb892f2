"""Model optimisation and export (quantise, prune, ONNX/TorchScript/safetensors) and serving."""
