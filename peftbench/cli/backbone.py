"""``peftbench backbone convert``: a release checkpoint (MAE, MoCo-v3, a timm state dict) converted once, in the
backbone preset's key layout, into a timm-layout .safetensors file that ``--checkpoint`` then reads
(:mod:`peftbench.backbones`, docs/backbones.md)."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("backbone", help="backbone tools: convert a release checkpoint to .safetensors",
                       description="Backbone tools. `convert` reads a release checkpoint in the key layout of a "
                                   "backbone preset (vit-b16-mae: MAE's mae_pretrain_vit_base.pth; vit-b16-mocov3: "
                                   "MoCo-v3's linear-vit-b-300ep.pth.tar or vit-b-300ep.pth.tar; a timm name: a "
                                   "timm state dict) without running any pickled code, maps every key onto the timm "
                                   "model (saying which it drops and why) and writes a .safetensors file.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = actions.add_parser("convert", help="convert a release checkpoint into a timm-layout .safetensors file")
    c.add_argument("--backbone", required=True, help="the preset (or timm name) whose layout the file has")
    c.add_argument("--checkpoint", required=True, help="the release file (.pth, .pth.tar, .safetensors)")
    c.add_argument("--out", required=True, help="the .safetensors file to write")
    p.set_defaults(func=main)


def main(args) -> int:
    from .._text import terminal
    from ..backbones import create_backbone, load_checkpoint, preset
    from ..errors import SettingsError
    from ..store.checkpoints import write_tensors

    source, out = Path(args.checkpoint), Path(args.out)
    if not source.is_file():
        raise SettingsError(f"--checkpoint {source}: no such file")
    if out.suffix != ".safetensors":
        raise SettingsError(f"--out {out}: the converted file is a .safetensors file")
    model = create_backbone(args.backbone, pretrained=False)
    p = preset(args.backbone)
    dropped = load_checkpoint(model, source, p.layout if p else "timm")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_tensors(out, state, what="the converted backbone")
    print(terminal(f"{out}: {len(state)} tensors in timm's layout (peftbench run --backbone {args.backbone} "
                   f"--checkpoint {out})"))
    for k, why in sorted(dropped.items()):
        print(terminal(f"  dropped {k}: {why}"))
    return 0
