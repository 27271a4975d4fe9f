"""``python -m resnet_fused``: the ``resnet-fused`` command."""

import sys

from .cli import main

sys.exit(main())
