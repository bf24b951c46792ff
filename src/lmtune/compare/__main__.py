"""`python -m lmtune.compare JOB`: the child process that trains, measures and scores one variant."""

import sys

from lmtune.compare.runner import child_main

sys.exit(child_main(sys.argv[1]))
