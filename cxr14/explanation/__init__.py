"""Explanations: Grad-CAM with its hooks in one class (`gradcam`), localisation against the expert boxes
(`localisation`), the examples chosen per class and their overlays (`examples`), and the sanity checks that
the maps depend on the model (`sanity`).
"""
