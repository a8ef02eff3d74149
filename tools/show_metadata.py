"""Print the metadata of a .safetensors file (kohya's `ss_*`, `modelspec.*`, ...) as sorted JSON.

    python tools/show_metadata.py --model my_lora.safetensors

Only the header is read, so this is instant even for multi-GB files. For a .ckpt, prints its non-tensor
entries (epoch, global_step) instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.tensor_files import CheckpointError, open_tensor_file  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a .safetensors file (or .ckpt)")
    args = p.parse_args(argv)
    try:
        with open_tensor_file(args.model) as source:
            if source.path.suffix.lower() == ".safetensors":
                data = source.metadata
            else:
                data = {k: v for k, v in source.values.items() if isinstance(v, (int, float, str, bool))}
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Values that are themselves JSON (ss_network_args, ss_datasets, ss_tag_frequency...) are shown decoded.
    decoded = {}
    for key, value in sorted(data.items()):
        try:
            decoded[key] = json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value
        except json.JSONDecodeError:
            decoded[key] = value
    print(json.dumps(decoded, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
