import sys

from checkpoints_sync.cli import main

sys.exit(main())
