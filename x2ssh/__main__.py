"""`python -m x2ssh` runs the command line."""

import sys

from x2ssh.cli import main

sys.exit(main())
