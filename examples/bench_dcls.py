"""Operator benchmark: our Dcls2d against DCLS 0.1.1 and a dense 7x7 depthwise conv.

Same as ``dclsify bench``, with the same options, e.g.::

    python examples/bench_dcls.py --device cuda --json bench.json
"""

import sys

from dclsify.cli import app

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]])
