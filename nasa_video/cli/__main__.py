"""`python -m nasa_video.cli ...` (torchrun -m nasa_video.cli too): the same as the nasa-video command."""
import sys

from . import main

sys.exit(main())
