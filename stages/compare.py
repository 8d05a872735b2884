"""`python -m stages.compare ...`: alias of the `cxr14-compare` console command (`cxr14.cli.compare_main`).

Kept for one release, for scripts written before the command existed; it will then be removed.
"""

from cxr14.cli import compare_main

if __name__ == "__main__":
    compare_main()
