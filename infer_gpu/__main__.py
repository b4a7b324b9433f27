import sys

from infer_gpu.cli import main

sys.exit(main())
