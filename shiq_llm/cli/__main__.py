"""``python -m shiq_llm.cli`` (and ``accelerate launch -m shiq_llm.cli``): the ``shiq-llm`` command."""

import sys

from shiq_llm.cli import main

sys.exit(main())
