import sys

from sumtune.cli import main

sys.exit(main())
