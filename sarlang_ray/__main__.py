import sys

from sarlang_ray.cli import main

sys.exit(main())
