import sys

from forge_dist.cli.main import main

sys.exit(main())
