"""The pipeline's DVC entry points, one per stage: `python -m stages.<name>` (see dvc.yaml); thin scripts over cxr14."""
