"""Thin adapters for other frameworks: ONNX export, torchvision detection, transformers configs and
detectron2 backbones. Each module imports its framework only when used; none is needed otherwise."""
