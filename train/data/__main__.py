"""Data tools: python -m train.data {inspect,blend,corpus,tokenizer} --help"""

import sys

from train.data.cli import main

sys.exit(main())
