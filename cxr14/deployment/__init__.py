"""Deployment: the ONNX export with its metadata, verified against PyTorch (`export`), the ONNX file's
metadata schema and session (`onnx_file`), and what `cxr14-predict` runs (`predict`: the ONNX and PyTorch
engines, decoding in threads, calibrated decisions and margins per class; the command is `cxr14.cli`).
"""
