import sys

from .retrain import main

sys.exit(main())
