"""The project's command-line entry point, as such projects have one:

    python -m userproj.cli OPTUNA_BEST --out DIR [--data FILE] [--report json|yaml|file]

It retrains from OPTUNA_BEST/config.yaml, saves the best weights to
DIR/weights/best.pt and reports its scores: a JSON line on stdout (json), a YAML
document on stdout (yaml), or DIR/metrics.json (file). Nothing here knows about
harness."""

import argparse
import json
import os

import torch
import yaml

from .train import retrain


def main(argv=None):
    p = argparse.ArgumentParser(prog="userproj")
    p.add_argument("optuna_best")
    p.add_argument("--out", required=True)
    p.add_argument("--data")
    p.add_argument("--report", choices=("json", "yaml", "file"), default="json")
    args = p.parse_args(argv)
    with open(os.path.join(args.optuna_best, "config.yaml")) as fh:
        config = yaml.safe_load(fh)
    print(f"retraining {args.optuna_best} for {config['training']['epochs']} epochs", flush=True)
    result = retrain(config, args.optuna_best, args.data)
    os.makedirs(os.path.join(args.out, "weights"), exist_ok=True)
    torch.save(result["state_dict"], os.path.join(args.out, "weights", "best.pt"))
    scores = {"val": result["val"], "test": result["test"], "val_loss": result["val_loss"],
              "weights_sha256": result["weights_sha256"]}
    print(f"best validation loss {result['val_loss']:.6f}", flush=True)
    if args.report == "json":
        print(json.dumps(scores))
    elif args.report == "yaml":
        print("---")
        print(yaml.safe_dump(scores, sort_keys=False), end="")
    else:
        with open(os.path.join(args.out, "metrics.json"), "w") as fh:
            json.dump(scores, fh)


if __name__ == "__main__":
    main()
