import sys

from llava_twist.demo.cli import main

sys.exit(main())
