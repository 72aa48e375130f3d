"""`python -m spd_assets.cli`: the same as `spd-cluster`."""

import sys

from spd_assets.cli.main import main

sys.exit(main())
