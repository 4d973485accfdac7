import sys

from scout_data.cli import main

sys.exit(main())
