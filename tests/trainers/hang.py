"""A trainer that prints one line and then hangs forever (for --timeout tests).

The print is deliberately not flushed: the harness must see it promptly anyway.
"""

import time


def train(cfg, ctx):
    print("hang: about to hang")
    while True:
        time.sleep(3600)
