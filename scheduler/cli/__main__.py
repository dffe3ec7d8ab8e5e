"""`python -m scheduler.cli`: the `reminders` command."""

import sys

from scheduler.cli import main

sys.exit(main())
