"""The project's training function: it reads ``data.path`` from its config and opens it as it stands,
so a relative path is looked up in the working directory, as plain Python does."""

import csv


def load_points(path):
    with open(path, newline="") as fh:
        return [float(row[0]) for row in csv.reader(fh) if row]


def retrain(config):
    points = load_points(config["data"]["path"])
    return {"val_loss": sum(points) / len(points), "extra": {"n": len(points)}}
