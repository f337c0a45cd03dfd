"""`python -m fastmlm ...` is the `fastmlm` command."""
import sys

from fastmlm.cli import main

sys.exit(main())
