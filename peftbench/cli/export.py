"""``peftbench export``: a finished run's model folded into a plain timm ViT (safetensors + timm config)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="write a finished run's model as a plain timm ViT (merged weights)",
                       description="Folds the run's trained update into the backbone's weights (methods that "
                                   "allow it: linear, full, bitfit, LoRA and the other peft tuners, SSF, "
                                   "RepAdapter, FacT, ...), checks that the logits are unchanged, and writes "
                                   "<key>.merged.safetensors + <key>.merged.json (timm.create_model arguments).")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--run", required=True, metavar="KEY", help="the run's key (or a unique prefix of it)")
    p.add_argument("--out", default=None, help="the .safetensors file (default: beside the run's record)")
    p.add_argument("--variant", default="merged", help="which inference variant to write (default merged)")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..export import export_run

    done = export_run(args.runs_dir, args.run, args.out, args.variant)
    print(f"{done.weights}\n{done.config}\n(max |logit difference| merged vs trained: {done.max_abs_diff:.2e})")
    return 0
