import sys

from train_tpu.cli import main

sys.exit(main())
