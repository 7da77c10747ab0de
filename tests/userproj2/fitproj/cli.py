"""python -m fitproj.cli --config CFG [--data CSV] [--out DIR] [--device DEV]"""

import argparse
import json
from pathlib import Path

from .api import load_config, train_and_eval


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fitproj", description="train one configuration and score it")
    ap.add_argument("--config", required=True, help="YAML config")
    ap.add_argument("--data", help="CSV file (default: data.path in the config, relative to the config)")
    ap.add_argument("--out", default="runs/cli", help="output directory (checkpoints/best.ckpt)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    data = args.data or str(Path(args.config).parent / cfg["data"]["path"])
    metrics = train_and_eval(cfg, data_path=data, out_dir=args.out, device=args.device, verbose=not args.quiet)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
