"""``peftbench data verify|prepare|bench``: check, build and time the task data."""
from __future__ import annotations

import sys
from pathlib import Path


def _names(text: str) -> list[str]:
    from ..tasks import parse_names

    return parse_names(text)


def _tasks(args):
    from ..errors import SettingsError
    from ..tasks import get_suite, get_task

    suite = get_suite(args.suite)
    tasks = [get_task(t) for t in (args.tasks or suite.tasks)]
    for t in tasks:
        if t.suite != suite.name:
            raise SettingsError(f"--tasks: task {t.name!r} belongs to suite {t.suite!r}, not {suite.name!r}")
    return suite, tasks


def _data_root(args, suite) -> Path:
    from ..tasks import default_data_root

    return Path(args.data_root) if args.data_root else default_data_root(suite)


def register(sub) -> None:
    p = sub.add_parser("data", help="verify, prepare or benchmark task data",
                       description="Check task data (verify), convert downloaded sources into the expected layout "
                                   "(prepare), or time the image loader (bench).")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    v = dsub.add_parser("verify", help="check every split file, size, class set and image; print fingerprints",
                        description="Checks every split file of the tasks: lines, labels, sizes, class sets, and "
                                    "that every image exists and decodes. Exits 1 listing each defect.")
    v.add_argument("--suite", default="demo", help="vtab | fgvc | demo")
    v.add_argument("--tasks", type=_names, help="comma-separated subset of the suite's tasks")
    v.add_argument("--data-root", help="data folder (default: $PEFTBENCH_DATA; the demo's own folder)")
    v.add_argument("--no-images", action="store_true", help="check split files only, do not open the images")
    v.add_argument("--recheck", action="store_true", help="decode every image even if verified before")
    v.add_argument("--workers", type=int, help="image-checking threads (default: 2 x CPUs, at most 16)")
    v.set_defaults(func=main_verify)

    pr = dsub.add_parser("prepare", help="how to get each task; convert downloaded sources (no TensorFlow)",
                         description="Without --source: print how to get each task's data. With --source: convert "
                                     "the downloaded public source into the layout peftbench reads.")
    pr.add_argument("--suite", required=True, help="vtab | fgvc")
    pr.add_argument("--task", "--tasks", dest="tasks", type=_names, help="task(s) to prepare (default: all found)")
    pr.add_argument("--source", help="folder holding the downloaded source files")
    pr.add_argument("--data-root", help="where to write (DATA_ROOT/vtab-1k/<task>/, DATA_ROOT/fgvc/<task>/)")
    pr.add_argument("--no-verify", action="store_true", help="do not verify what was written")
    pr.set_defaults(func=main_prepare)

    b = dsub.add_parser("bench", help="loader images/s: cold decode vs the warm memory-mapped cache",
                        description="Times decoding a split from its image files (cold) against reading it from the "
                                    "decoded-image cache (warm: random batches from the memory map).")
    b.add_argument("--suite", default="demo")
    b.add_argument("--tasks", type=_names)
    b.add_argument("--data-root")
    b.add_argument("--split", help="split to time (default: the task's final training split)")
    b.add_argument("--size", type=int, default=224, help="model input size (default 224)")
    b.add_argument("--limit", type=int, help="time only the first N images")
    b.set_defaults(func=main_bench)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def main_verify(args) -> int:
    from ..data.verify import verify_task

    suite, tasks = _tasks(args)
    root = _data_root(args, suite)
    failed = 0
    for t in tasks:
        rep = verify_task(t, root, check_images=not args.no_images, workers=args.workers,
                          use_stamp=not args.recheck)
        print("\n".join(rep.lines()), flush=True)
        failed += not rep.ok
    print(f"\n{len(tasks) - failed}/{len(tasks)} task(s) OK" + (f", {failed} FAILED" if failed else ""))
    return 1 if failed else 0


def main_prepare(args) -> int:
    from ..data.prepare import instructions, prepare
    from ..errors import SettingsError

    if not args.source:
        for t in args.tasks or [None]:
            print(instructions(args.suite, t))
        return 0
    if not args.data_root:
        raise SettingsError("--data-root is required with --source")
    written = prepare(args.suite, args.tasks, Path(args.source), Path(args.data_root),
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    if not written:
        print("nothing converted: no source files found (see `peftbench data prepare --suite "
              f"{args.suite}` for what each task needs)", file=sys.stderr)
        return 1
    if args.no_verify:
        return 0
    from ..data.verify import verify_task

    bad = 0
    for task, _ in written:
        rep = verify_task(task, Path(args.data_root))
        print("\n".join(rep.lines()))
        bad += not rep.ok
    return 1 if bad else 0


def main_bench(args) -> int:
    from ..data.bench import bench

    suite, tasks = _tasks(args)
    root = _data_root(args, suite)
    print(f"{'task':<22} {'split':<15} {'images':>7} {'px':>4}  {'cold decode':>15}  {'warm memmap':>15}"
          f"  {'torch x[idx]':>15}")
    for t in tasks:
        split = args.split or t.splits["final"][0]
        r = bench(t, root, split, args.size, limit=args.limit)
        warm = (f"{r['warm_memmap_img_s']:>9.0f} img/s  {r['torch_index_img_s']:>9.0f} img/s"
                if r.get("warm_memmap_img_s") else "    (cache off)")
        print(f"{t.name:<22} {split:<15} {r['images']:>7} {r['stored']:>4}  {r['cold_decode_img_s']:>9.0f} img/s  "
              f"{warm}", flush=True)
    print("cold: decode + resize with PIL in threads (what the first use of a split costs); warm memmap: random\n"
          "batches gathered with numpy from the decoded-image cache, as the training loop does (every later use);\n"
          "torch x[idx]: the same batches gathered with torch indexing, for comparison")
    return 0
