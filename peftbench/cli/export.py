"""``peftbench export``: publish a finished run as a Hugging Face hub folder (or one plain timm file), and upload it."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="write a finished run as a Hugging Face hub folder (model card, weights, loaders)",
                       description="Writes a folder in the Hugging Face hub layout (docs/export.md): README.md (a model "
                                   "card), peftbench_model.safetensors + peftbench_config.json for every method "
                                   "(peftbench.load_pretrained), model.safetensors + config.json (timm's format) when "
                                   "the method folds into a plain ViT, adapter_config.json + adapter_model.safetensors "
                                   "when it is a peft tuner. Every file is reloaded and checked against the trained "
                                   "model's logits first. --out FILE.safetensors writes only the merged plain timm "
                                   "weights and their timm config.")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--run", default=None, metavar="KEY",
                   help="the run's key or a unique prefix of it (`peftbench status --all` lists them)")
    p.add_argument("--method", default=None, help="the run's method (with --task, instead of --run)")
    p.add_argument("--task", default=None, help="the run's task")
    p.add_argument("--seed", type=int, default=None, help="the run's seed (when the method and task have several)")
    p.add_argument("--out", default=None,
                   help="the folder to write (default ./export/<method>-<task>-s<seed>-<key>); a path ending "
                        "in .safetensors: one plain timm file of the merged model instead")
    p.add_argument("--variant", default="merged", help="with --out FILE.safetensors: which inference variant to write")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="upload the folder to this Hugging Face hub repository (user/name), created if needed")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.set_defaults(func=main)


def main(args) -> int:
    from pathlib import Path

    from .._io import safe_component
    from ..errors import SettingsError
    from ..export import export_folder, export_run, push_to_hub, select_run
    from ..store import RunStore

    safe_component(args.variant, "--variant")  # it names a file: checked before anything is read
    single = args.out is not None and args.out.endswith(".safetensors")
    if single and args.push_to_hub:
        raise SettingsError("--push-to-hub uploads a folder: leave out --out FILE.safetensors")
    if args.variant != "merged" and not single:
        raise SettingsError(f"--variant {args.variant}: it picks the model of a single file (--out FILE.safetensors); "
                            "a folder holds every format the method has")
    if args.private and not args.push_to_hub:
        raise SettingsError("--private: it applies to the repository --push-to-hub creates")
    if single and Path(args.out).exists():
        raise SettingsError(f"--out {args.out}: exists (nothing is overwritten)")
    rec = select_run(RunStore(args.runs_dir), key=args.run, method=args.method, task=args.task, seed=args.seed)
    if single:
        done = export_run(args.runs_dir, rec.key, args.out, args.variant, rec=rec)
        print(f"{done.weights}\n{done.config}\n(max |logit difference| merged vs trained: {done.max_abs_diff:.2e})")
        return 0
    folder = export_folder(args.runs_dir, args.out, rec=rec, repo=args.push_to_hub)
    checks = ", ".join(f"{k} {v:.1e}" for k, v in folder.diffs.items())
    print(f"{folder.folder}\n  " + "\n  ".join(folder.files) + f"\n(reloaded and checked, max |logit difference|: "
          f"{checks})")
    if args.push_to_hub:
        url = push_to_hub(folder.folder, args.push_to_hub, private=args.private)
        print(f"uploaded to {url}")
    return 0
