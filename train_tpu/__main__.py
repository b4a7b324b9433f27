import sys

from common import quiet

quiet.quiet(verbose="--verbose" in sys.argv[1:])  # before anything imports TensorFlow

from train_tpu.cli import main  # noqa: E402

sys.exit(main())
