"""Export a finished run as parts other libraries load: image_tower/ (safetensors + config.json),
text_tower/ (Hugging Face save_pretrained, with its tokenizer), text_adapter/ (the peft LoRA
adapter), heads.safetensors (every other weight), the run's config and results, and a README.md
model card that says how to load each part (docs/INFERENCE.md).

    python scripts/export.py runs/ad_pretrain --out exports/ad_pretrain
    python scripts/export.py runs/llama_pretrain --out exports/llama --merge-lora   # + text_merged/
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

if importlib.util.find_spec("trainer") is None:  # running from a checkout without pip install -e
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="a finished run's train.output_dir")
    parser.add_argument("--out", required=True, help="the export folder to write")
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        help="also write text_merged/: the LoRA adapter merged into its base (a 4-bit base "
        "dequantised to bf16 first)",
    )
    parser.add_argument("--device", default="cpu", help="where the run's model is loaded")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from trainer.config import ConfigError
    from trainer.export import export_run

    try:
        manifest = export_run(args.run_dir, args.out, args.merge_lora, args.device)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} -> {args.out}:")
    for name in manifest["files"]:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
