"""Helper process that serves one sandbox volume mount.

Started by :mod:`chalkcompute.sandbox` as ``python -m chalkcompute._mount
JSON``; the JSON object contains the arguments of ``_native.serve_mount``. The
process prints ``ready`` once the mount is usable and runs until SIGTERM or
until its parent ends.
"""

import json
import sys

from . import _native


def main() -> None:
    arguments = json.loads(sys.argv[1])
    _native.serve_mount(**arguments)


if __name__ == "__main__":
    main()
