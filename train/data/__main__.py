"""Data tools: python -m train.data {inspect,blend} --help"""

import sys

from train.data.cli import main

sys.exit(main())
