"""python -m train.eval [...]: the documented command for train/compare.py (student vs teacher).

    python -m pytest tests/unit/test_eval_cli.py

Only the entry point lives here; the code, its options and its docs are train/compare.py's.
"""

import sys

from train.compare import main

if __name__ == "__main__":
    sys.exit(main())
