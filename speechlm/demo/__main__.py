"""`python -m speechlm.demo`."""

import sys

from speechlm.demo.pipeline import main

sys.exit(main())
