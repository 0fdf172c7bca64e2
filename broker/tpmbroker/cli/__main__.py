"""`python -m tpmbroker.cli`, as the `tpmbroker` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
