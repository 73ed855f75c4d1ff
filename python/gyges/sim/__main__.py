import sys

from gyges.sim.cli import main

sys.exit(main())
