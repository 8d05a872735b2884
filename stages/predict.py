"""Alias of the `cxr14-predict` console command: `python -m stages.predict IMAGE ... [--json] [--gradcam DIR]`."""

from cxr14.deployment.predict import main

if __name__ == "__main__":
    main()
