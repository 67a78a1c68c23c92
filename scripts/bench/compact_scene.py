"""Copy a gs-synth scene with JPEG images and no depth or sidecars, small enough to carry to the GPU machine.

python scripts/bench/compact_scene.py SRC DST [--quality 95]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--quality", type=int, default=95)
    args = parser.parse_args()
    meta = json.loads((args.src / "transforms.json").read_text())
    (args.dst / "images").mkdir(parents=True, exist_ok=True)
    renamed = {}
    for frame in meta["frames"]:
        old = frame["file_path"]
        new = str(Path(old).with_suffix(".jpg"))
        Image.open(args.src / old).convert("RGB").save(args.dst / new, quality=args.quality)
        frame["file_path"] = renamed[old] = new
        frame.pop("depth_file_path", None)
    for key in ("train_filenames", "val_filenames", "test_filenames"):
        if key in meta:
            meta[key] = [renamed.get(name, name) for name in meta[key]]
    shutil.copy(args.src / meta["ply_file_path"], args.dst / meta["ply_file_path"])
    (args.dst / "transforms.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()
