"""Deployment: the ONNX export with its metadata, verified against PyTorch (`export`), the ONNX file's
metadata schema and session (`onnx_file`), and the predict engine behind `cxr14-predict` (`predict`).
"""
