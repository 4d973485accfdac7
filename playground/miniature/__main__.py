import sys

from playground.miniature.cli import main

sys.exit(main())
