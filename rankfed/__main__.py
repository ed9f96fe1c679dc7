import sys

from rankfed.cli import main

sys.exit(main())
