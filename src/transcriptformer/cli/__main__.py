"""``python -m transcriptformer.cli`` (as torchrun launches it) runs the command line."""

import sys

from . import main

sys.exit(main())
