import sys

from entropyinfer.cli import main

sys.exit(main())
