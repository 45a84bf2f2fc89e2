import sys

from vitkern.cli import main

sys.exit(main())
