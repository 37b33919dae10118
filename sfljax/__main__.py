import sys

from sfljax.cli import main

sys.exit(main())
