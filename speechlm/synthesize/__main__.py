"""`python -m speechlm.synthesize`."""

import sys

from speechlm.synthesize.synthesizer import main

sys.exit(main())
