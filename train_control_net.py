"""kohya's name for train_controlnet.py (same flags, same script)."""

import sys

from train_controlnet import main

if __name__ == "__main__":
    sys.exit(main())
