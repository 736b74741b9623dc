"""``python -m pyalign.cli ...`` (and ``torchrun -m pyalign.cli train ...``): the same as
``pyalign ...``."""
import sys

from pyalign.cli import main

sys.exit(main())
