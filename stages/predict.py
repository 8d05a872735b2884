"""`python -m stages.predict ...`: alias of the `cxr14-predict` console command (`cxr14.cli.predict_main`).

Kept for one release, for scripts written before the command existed; it will then be removed.
"""

from cxr14.cli import predict_main

if __name__ == "__main__":
    predict_main()
