"""`python -m speechlm.evaluate`."""

import sys

from speechlm.evaluate.evaluator import main

sys.exit(main())
