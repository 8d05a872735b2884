"""The model: built by name with optional ImageNet weights and frozen layers (`factory`), saved and loaded as
tensors and plain data only (`checkpoint`), and run the same way by every stage that needs probabilities
(`inference`).
"""
